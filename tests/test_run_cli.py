"""`selftune run` end to end: the MLflow contract, the pseudo-label artifacts, progress output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import REPO, quickstart_overrides
from selftune.cli import main
from selftune.metrics import PseudoLabelQuality
from selftune.stages.data import prepare_data
from selftune.config import load_pipeline

QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")


def search(tracking_uri: str, experiment: str, filter_string: str = ""):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="list")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, session_home):
    """One small local-mode quickstart run shared by the checks below."""
    import os

    os.environ["SELFTUNE_CACHE"] = str(session_home / "cache")
    root = tmp_path_factory.mktemp("quickstart")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "out"
    code = main(["run", QUICKSTART, *quickstart_overrides(), "--out", str(out), "--tracking-uri", uri, "--experiment", "qs"])
    return {"code": code, "uri": uri, "out": out}


def test_run_finishes_and_prints_the_stage_table(quickstart_run, capsys):
    assert quickstart_run["code"] == 0


def test_pipeline_and_stage_runs_follow_the_mlflow_contract(quickstart_run):
    uri = quickstart_run["uri"]
    (pipeline,) = search(uri, "qs", "tags.`selftune.kind` = 'pipeline'")
    stages = search(uri, "qs", "tags.`selftune.kind` = 'stage'")
    assert pipeline.info.status == "FINISHED"
    assert sorted(s.data.tags["selftune.stage"] for s in stages) == ["pseudo_label", "self_train", "supervised"]
    for stage in stages:
        tags = stage.data.tags
        assert stage.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == pipeline.info.run_id
        assert Path(tags["selftune.output_dir"]).is_absolute() and Path(tags["selftune.output_dir"]).is_dir()
        assert tags["selftune.stage_index"] in {"0", "1", "2"}
    by_name = {s.data.tags["selftune.stage"]: s for s in stages}
    supervised = by_name["supervised"].data
    assert {"train/loss", "train/loss_seg", "val/miou", "val/pixel_accuracy"} <= set(supervised.metrics)
    assert any(key.startswith("val/iou/") for key in supervised.metrics)
    assert supervised.params["epochs"] == "2" and supervised.params["optimizer.lr"] == "0.002"
    assert {"train/loss_seg", "train/loss_pseudo", "val/miou"} <= set(by_name["self_train"].data.metrics)
    labelling = by_name["pseudo_label"].data.metrics
    for key in ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"):
        assert 0.0 <= labelling[key] <= 1.0
    assert any(key.startswith("pseudo_label/iou/") for key in labelling)
    # The pipeline run carries per-stage summaries so trials compare in one table.
    metrics = pipeline.data.metrics
    assert metrics["val/miou"] == pytest.approx(by_name["self_train"].data.metrics["val/miou"])
    assert metrics["supervised/val/miou"] == pytest.approx(supervised.metrics["val/miou"])
    assert metrics["pseudo_label/pseudo_label/miou"] == pytest.approx(labelling["pseudo_label/miou"])
    assert pipeline.data.params["stages.supervised.epochs"] == "2"


def test_val_miou_is_logged_per_epoch_then_the_kept_checkpoint(quickstart_run):
    from mlflow import MlflowClient

    uri = quickstart_run["uri"]
    (stage,) = search(uri, "qs", "tags.`selftune.stage` = 'supervised'")
    history = MlflowClient(uri).get_metric_history(stage.info.run_id, "val/miou")
    per_epoch = [m.value for m in history][:2]
    assert [m.step for m in history][:2] == [1, 2]
    assert history[-1].value == pytest.approx(max(per_epoch))


def test_artifacts_pipeline_yaml_overlays_and_confusion_matrix(quickstart_run):
    from mlflow import MlflowClient

    uri = quickstart_run["uri"]
    client = MlflowClient(uri)
    (pipeline,) = search(uri, "qs", "tags.`selftune.kind` = 'pipeline'")
    assert "pipeline.yaml" in [a.path for a in client.list_artifacts(pipeline.info.run_id)]
    (labelling,) = search(uri, "qs", "tags.`selftune.stage` = 'pseudo_label'")
    overlays = client.list_artifacts(labelling.info.run_id, "pseudo_label_overlays")
    assert len(overlays) >= 1 and all(a.path.endswith(".png") for a in overlays)
    (supervised,) = search(uri, "qs", "tags.`selftune.stage` = 'supervised'")
    assert "confusion_matrix.png" in [a.path for a in client.list_artifacts(supervised.info.run_id)]


def test_pseudo_label_pngs_reproduce_the_logged_quality(quickstart_run):
    uri = quickstart_run["uri"]
    (labelling,) = search(uri, "qs", "tags.`selftune.stage` = 'pseudo_label'")
    folder = Path(labelling.data.tags["selftune.output_dir"]) / "pseudo_labels"
    pipeline = load_pipeline(QUICKSTART)
    data = prepare_data(pipeline.data, pipeline.seed)
    quality = PseudoLabelQuality(data.num_classes)
    import torch
    from selftune.data import read_mask

    for sample in data.unlabelled:
        pseudo = np.array(Image.open(folder / f"{sample.id}.png"))
        truth = read_mask(sample.mask, data.num_classes)
        quality.update(torch.from_numpy(pseudo).long(), torch.from_numpy(truth).long())
    result = quality.compute()
    assert result["miou"] == pytest.approx(labelling.data.metrics["pseudo_label/miou"], abs=1e-6)
    assert result["kept_fraction"] == pytest.approx(labelling.data.metrics["pseudo_label/kept_fraction"], abs=1e-6)


def test_stage_outputs_are_explicit_artifacts(quickstart_run):
    out = quickstart_run["out"]
    assert (out / "pipeline.yaml").is_file()
    assert json.loads((out / "0-supervised" / "checkpoint" / "model.json").read_text())["name"] == "small_segnet"
    assert (out / "2-self_train" / "checkpoint" / "model.pt").is_file()
    summary = json.loads((out / "2-self_train" / "summary.json").read_text())
    assert 0.0 <= summary["val/miou"] <= 1.0


def test_an_existing_output_folder_is_never_overwritten(quickstart_run, capsys, tracking_uri):
    code = main(["run", QUICKSTART, "--out", str(quickstart_run["out"]), "--tracking-uri", tracking_uri])
    assert code == 2
    assert "folder exists and is not empty" in capsys.readouterr().err
    assert (quickstart_run["out"] / "2-self_train" / "summary.json").is_file()
