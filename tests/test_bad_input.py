"""Bad input: one line on stderr naming the file/key/value, exit code 2, no traceback, and no
MLflow run left RUNNING."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import REPO
from selftune.cli import main

QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")
TINY = [
    "--set", "stages.supervised.epochs=1", "--set", "stages.supervised.steps_per_epoch=1",
    "--set", "stages.self_train.epochs=1", "--set", "stages.self_train.steps_per_epoch=1",
    "--set", "data.crop_size=16", "--set", "data.labelled=3",
]


def write_folder_dataset(root: Path, *, bad_mask_id: str | None = None, corrupt_image_id: str | None = None) -> Path:
    """6 train + 2 val images of 16x16 with 3 classes in the folder format, plus 2 unlabelled-only
    train images (no mask), so a labelled set of 6 leaves something to pseudo-label."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(8)]
    for sample_id in [*ids, "extra0", "extra1"]:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{sample_id}.png")
        if sample_id.startswith("extra"):
            continue
        mask = rng.integers(0, 3, (16, 16), dtype=np.uint8)
        if sample_id == bad_mask_id:
            mask[3, 4] = 7  # neither a class index (0..2) nor 255
        Image.fromarray(mask).save(root / "masks" / f"{sample_id}.png")
    if corrupt_image_id:
        (root / "images" / f"{corrupt_image_id}.png").write_bytes(b"not a png at all")
    (root / "splits" / "train.txt").write_text("\n".join([*ids[:6], "extra0", "extra1"]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[6:]) + "\n")
    (root / "classes.txt").write_text("background\nthing\nstuff\n")
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("selftune: error:")]


def assert_no_run_left_running(tracking_uri: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(run.info.status != "RUNNING" for run in runs)
    return runs


def test_missing_dataset_root(tmp_path, capsys, tracking_uri):
    missing = tmp_path / "no-such-dataset"
    code, err = run_cli(["run", QUICKSTART, "--set", "data.dataset=folder", "--set", f"data.root={missing}",
                         "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert str(missing) in line and "does not exist" in line
    assert assert_no_run_left_running(tracking_uri) == []  # refused before any run was created


def test_malformed_yaml(tmp_path, capsys, tracking_uri):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nstages:\n  - name: a\n    kind: [supervised\n")
    code, err = run_cli(["run", str(broken), "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "broken.yaml: malformed YAML (line" in line


def test_unknown_key(tmp_path, capsys, tracking_uri):
    code, err = run_cli(["run", QUICKSTART, "--set", "stages.supervised.epohcs=3", "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "quickstart.yaml: stages.supervised.epohcs: unknown key" in line and "epochs" in line


def test_out_of_range_value(tmp_path, capsys, tracking_uri):
    code, err = run_cli(["run", QUICKSTART, "--set", "stages.pseudo_label.threshold=1.5", "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "stages.pseudo_label.threshold" in line and "1.5" in line


def test_a_round_schedule_out_of_range_names_the_key_the_user_wrote(tmp_path, capsys, tracking_uri):
    dst_cbc = str(REPO / "pipelines" / "dst_cbc.yaml")
    code, err = run_cli(["run", dst_cbc, "--set", "stages.dst.schedules.label.alpha.end=1.5",
                         "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("selftune: error: ") and line.endswith(
        "dst_cbc.yaml: stages.dst.schedules.label.alpha.end: Input should be less than or equal to 1, "
        "got 1.5 (round 4 of 5 would get 1.175)")
    assert "Traceback" not in err
    assert assert_no_run_left_running(tracking_uri) == []  # refused before any run was created


def test_bad_mask_value_fails_the_runs_and_names_the_file(tmp_path, capsys, tracking_uri):
    root = write_folder_dataset(tmp_path / "data", bad_mask_id="img0")
    code, err = run_cli(["run", QUICKSTART, *TINY, "--set", "data.dataset=folder", "--set", f"data.root={root}",
                         "--set", "data.labelled=6", "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert str(root / "masks" / "img0.png") in line and "7" in line
    runs = assert_no_run_left_running(tracking_uri)
    assert {run.info.status for run in runs} == {"FAILED"}
    assert any("img0.png" in run.data.tags.get("selftune.error", "") for run in runs)


def test_unreadable_image_in_a_subprocess_gives_exit_2_and_no_traceback(tmp_path, tracking_uri):
    root = write_folder_dataset(tmp_path / "data", corrupt_image_id="img1")
    result = subprocess.run(
        [sys.executable, "-m", "selftune", "run", QUICKSTART, *TINY, "--set", "data.dataset=folder",
         "--set", f"data.root={root}", "--set", "data.labelled=6", "--out", str(tmp_path / "out"),
         "--tracking-uri", tracking_uri],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert str(root / "images" / "img1.png") in line
    runs = assert_no_run_left_running(tracking_uri)
    assert runs and {run.info.status for run in runs} == {"FAILED"}


def test_pipeline_path_that_is_a_folder_says_so(tmp_path, capsys, tracking_uri):
    code, err = run_cli(["run", str(tmp_path), "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line == f"selftune: error: {tmp_path}: is a folder, not a YAML file"


def test_unknown_model_name_is_caught_at_load_naming_the_key(tmp_path, capsys, tracking_uri):
    code, err = run_cli(["run", QUICKSTART, "--set", "model.name=nope", "--out", str(tmp_path / "out"),
                         "--tracking-uri", tracking_uri], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "model.name: unknown model 'nope'; registered models are: " in line and "small_segnet" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # before any run or folder


def test_unknown_model_name_in_a_search_is_caught_when_the_space_loads(tmp_path):
    from selftune.errors import ConfigError
    from selftune.search.space import load_search_space

    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'nope'; registered models are: .*small_segnet"):
        load_search_space(REPO / "search_spaces" / "quickstart.yaml", ["model.name=nope"])


def test_unreachable_database_uri_is_one_line_within_seconds(tmp_path):
    import time

    uri = "postgresql+psycopg2://someone:secret@127.0.0.1:1/mlflow"  # nothing listens on port 1
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "selftune", "run", QUICKSTART, *TINY, "--out", str(tmp_path / "out"),
                             "--tracking-uri", uri], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert time.monotonic() - started < 30  # MLflow alone retried for 104 s
    (line,) = error_lines(result.stderr)
    assert "postgresql+psycopg2://someone:***@127.0.0.1:1/mlflow is unreachable" in line
    assert "Traceback" not in result.stderr and "secret" not in result.stderr


def test_database_uri_without_its_driver_names_the_package(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg (SQLAlchemy's default PostgreSQL driver) is installed here")
    code, err = run_cli(["run", QUICKSTART, "--out", str(tmp_path / "out"),
                         "--tracking-uri", "postgresql://someone@127.0.0.1:1/mlflow"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "postgresql://someone@127.0.0.1:1/mlflow: its database driver 'psycopg' is not installed" in line
    assert "psycopg2" in line and "postgresql+psycopg2://someone@127.0.0.1:1/mlflow" in line
