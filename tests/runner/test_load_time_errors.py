"""Problems a pipeline carries are one-line errors when it loads: exit 2, no traceback, and no
MLflow run is created (nothing has started yet)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from selftune.cli import main
from support import REPO

QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")
U2PL = str(REPO / "pipelines" / "u2pl.yaml")
THREE_STAGE = str(REPO / "pipelines" / "three_stage.yaml")


def _runs(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    if not database.exists():
        return []
    client = MlflowClient(tracking_uri)
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


@pytest.mark.parametrize(("pipeline", "setting", "message"), [
    (THREE_STAGE, "stages.stage2.pseudo_labels=pseudo_label_2",
     r"three_stage\.yaml: stages\.stage2\.pseudo_labels: 'pseudo_label_2' comes later in the pipeline"),
    (THREE_STAGE, "stages.stage2.pseudo_labels=nope",
     r"three_stage\.yaml: stages\.stage2\.pseudo_labels: 'nope' is not a stage of this pipeline"),
    (QUICKSTART, "stages.self_train.pseudo_labels=supervised",
     r"stages\.self_train\.pseudo_labels: 'supervised' is not an earlier stage that produces pseudo_labels; valid: pseudo_label"),
    (QUICKSTART, "data.labelled=1.0",
     r"stages\.pseudo_label: a pseudo_label stage needs unlabelled images, but data\.labelled=1\.0 labels all"),
    (U2PL, "stages.u2pl.r_l=20",
     r"u2pl\.yaml: stages\.u2pl.*r_l < r_h.*r_l=20, r_h=20"),
])
def test_a_bad_pipeline_is_refused_at_load(tmp_path, capsys, tracking_uri, pipeline, setting, message):
    code = main(["run", pipeline, "--set", setting, "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "Traceback" not in err[0]
    import re

    assert re.search(message, err[0]), err[0]
    assert _runs(tracking_uri) == []
    assert not (tmp_path / "out").exists()


def test_a_pipeline_loads_in_a_fresh_process_without_importing_the_stages_first():
    code = "from selftune.config import load_pipeline; print(len(load_pipeline('pipelines/dst_cbc.yaml').stages))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.strip() == "11"


def test_an_out_that_is_a_file_is_one_line_and_the_file_stays(tmp_path, capsys, tracking_uri):
    target = tmp_path / "results.txt"
    target.write_text("earlier results")
    code = main(["run", QUICKSTART, "--out", str(target), "--tracking-uri", tracking_uri])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"--out {target}: is a file" in line
    assert target.read_text() == "earlier results"
