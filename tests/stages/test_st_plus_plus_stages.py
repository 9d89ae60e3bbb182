"""ST++ stage kinds: snapshots, stability selection, strong re-training, relabelling; one end-to-end run.

(Named ``*_stages`` because ``tests/methods/test_st_plus_plus.py`` already exists and pytest needs
unique basenames in a tree without ``__init__.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest

from support import REPO
from selftune.cli import main
from selftune.config import load_pipeline
from selftune.errors import ConfigError
from selftune.methods.st_plus_plus import snapshot_epochs
from selftune.stages.st_plus_plus import StabilitySelectStage, strong_pipeline

PIPELINE = REPO / "pipelines" / "st_plus_plus.yaml"


def test_snapshot_epochs_are_the_authors_thirds():
    assert snapshot_epochs(6, 3) == [2, 4, 6]
    assert snapshot_epochs(80, 3) == [26, 53, 80]  # ST++: epochs // 3, 2 * epochs // 3, epochs
    assert snapshot_epochs(7, 2) == [3, 7]
    assert snapshot_epochs(3, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="epochs >= snapshots must hold"):
        snapshot_epochs(2, 3)
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        snapshot_epochs(5, 1)


def test_snapshots_default_to_the_closest_snapshot_stage():
    assert StabilitySelectStage(name="s", model_from="a", snapshots_from="b").upstream() == {"model": "a", "snapshots": "b"}
    pipeline = load_pipeline(str(PIPELINE))
    select = next(stage for stage in pipeline.stages if stage.kind == "stability_select")
    assert select.snapshots_from == "supervised" and select.upstream()["snapshots"] == "supervised"


def test_pipeline_references_resolve_to_the_st_plus_plus_chain():
    pipeline = load_pipeline(str(PIPELINE))
    by_name = {stage.name: stage for stage in pipeline.stages}
    assert by_name["select"].model_from == "supervised"
    assert by_name["retrain_reliable"].pseudo_labels == "select"
    assert by_name["retrain_reliable"].init_from is None  # fresh weights, as the authors
    assert by_name["relabel"].model_from == "retrain_reliable"
    assert by_name["relabel"].upstream() == {"model": "retrain_reliable", "pseudo_labels": "select"}
    assert by_name["retrain_all"].pseudo_labels == "relabel"


def test_too_few_epochs_for_the_snapshots_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stages\.supervised.*epochs >= snapshots must hold"):
        load_pipeline(str(PIPELINE), ["stages.supervised.epochs=2"])


def _augment(strong_p: float, cutout_p: float, seed: int):
    import random

    transform = strong_pipeline(32, (1.0, 1.0), False, strong_p=strong_p, cutout_p=cutout_p)
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    mask = np.ones((32, 32), dtype=np.uint8)
    out = transform(image=image, mask=mask, masks=[np.ones((32, 32), dtype=np.uint8)])
    return image, out["image"], out["mask"]


def test_cutout_pixels_are_ignored_in_the_pseudo_label():
    image, augmented, mask = _augment(strong_p=1.0, cutout_p=1.0, seed=0)
    cut = mask == 255
    assert 0.01 < cut.mean() < 0.5  # one box of 2-40 % of the image
    assert set(np.unique(mask[~cut])) == {1}


def test_strength_zero_leaves_image_and_label_alone():
    for seed in range(5):
        image, augmented, mask = _augment(strong_p=0.0, cutout_p=1.0, seed=seed)
        assert (augmented == image).all() and (mask == 1).all()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """ST++ on a 60-image synthetic set, two snapshots, seconds per stage."""
    from selftune.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("stpp")
    data = generate_synthetic(root / "data", num_train=60, num_val=16)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = ["data.root=" + str(data), "data.labelled=8", "stages.supervised.snapshots=2",
            "stages.select.scales=[1.0, 1.5]", "stages.relabel.scales=[1.0]", "stages.relabel.flip=false",
            "stages.select.reliable_fraction=0.25"]
    for stage in ("supervised", "retrain_reliable", "retrain_all"):
        sets += [f"stages.{stage}.epochs=2", f"stages.{stage}.steps_per_epoch=2"]
    args = [arg for item in sets for arg in ("--set", item)]
    code = main(["run", str(PIPELINE), *args, "--out", str(root / "out"), "--tracking-uri", uri, "--experiment", "stpp"])
    return {"code": code, "uri": uri, "out": root / "out"}


@pytest.mark.slow
def test_st_plus_plus_end_to_end(tiny_run):
    import mlflow

    assert tiny_run["code"] == 0
    mlflow.set_tracking_uri(tiny_run["uri"])
    runs = mlflow.search_runs(experiment_names=["stpp"], filter_string="tags.`selftune.kind` = 'stage'", output_format="list")
    by_name = {run.data.tags["selftune.stage"]: run for run in runs}
    assert sorted(by_name) == ["relabel", "retrain_all", "retrain_reliable", "select", "supervised"]
    assert all(run.info.status == "FINISHED" for run in runs)
    for name in ("supervised", "retrain_reliable", "retrain_all"):
        assert "val/miou" in by_name[name].data.metrics
    for name in ("select", "relabel"):
        metrics = by_name[name].data.metrics
        for key in ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"):
            assert 0.0 <= metrics[key] <= 1.0
        assert any(key.startswith("pseudo_label/iou/") for key in metrics)
    assert "stability/reliable_image_miou" in by_name["select"].data.metrics
    assert 0.0 <= by_name["relabel"].data.metrics["pseudo_label_all/miou"] <= 1.0

    out = tiny_run["out"]
    folders = {path.name.split("-", 1)[1]: path for path in out.iterdir() if path.is_dir() and "-" in path.name}
    assert sorted(p.name for p in (folders["supervised"] / "snapshots").iterdir()) == ["1", "2"]
    reliable = (folders["select"] / "reliable.txt").read_text().split()
    unreliable = (folders["select"] / "unreliable.txt").read_text().split()
    assert len(reliable) == int(0.25 * (len(reliable) + len(unreliable))) and not set(reliable) & set(unreliable)
    assert sorted(p.stem for p in (folders["select"] / "pseudo_labels").glob("*.png")) == sorted(reliable)
    assert sorted(p.stem for p in (folders["relabel"] / "pseudo_labels").glob("*.png")) == sorted(reliable + unreliable)
    import json

    assert json.loads((folders["retrain_reliable"] / "summary.json").read_text())["val/best_epoch"] in (1, 2)
