"""The same pipeline with 2 real DDP workers over gloo (Ray Train starts them as separate processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, quickstart_overrides

QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")


@pytest.mark.slow
def test_quickstart_with_two_gloo_workers(tmp_path, tracking_uri, small_synthetic):
    import mlflow

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "selftune", "run", QUICKSTART, *quickstart_overrides(epochs=3, steps=15),
         "--set", f"data.root={small_synthetic}", "--set", "resources.workers=2", "--out", str(out), "--tracking-uri", tracking_uri, "--experiment", "ddp"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    stages = {r.data.tags["selftune.stage"]: r for r in runs if r.data.tags.get("selftune.kind") == "stage"}
    assert set(stages) == {"supervised", "pseudo_label", "self_train"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # Both workers labelled their shard: one PNG per unlabelled image.
    labels = list((out / "1-pseudo_label" / "pseudo_labels").glob("*.png"))
    from selftune.config import load_pipeline
    from selftune.stages.data import prepare_data

    pipeline = load_pipeline(QUICKSTART, [f"data.root={small_synthetic}"])
    assert len(labels) == len(prepare_data(pipeline.data, pipeline.seed).unlabelled)
    # Learning happened across workers: the training loss fell in both training stages, and both
    # models are far above predicting background everywhere (val mIoU ~0.11 on this dataset).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in ("supervised", "self_train"):
        losses = [m.value for m in client.get_metric_history(stages[name].info.run_id, "train/loss")]
        assert losses[-1] < losses[0]
        assert 0.3 < stages[name].data.metrics["val/miou"] <= 1.0

