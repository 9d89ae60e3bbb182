"""One FINISHED stage run per (parent, stage) across sessions of the same parent (a resumed trial).

A trial whose last session ended right after a stage (Tune stops a trial at its next report, so
the stage's outputs and FINISHED run exist but Tune never saw the report) starts again from that
stage: the stage store still holds it, and its FINISHED run is kept rather than recorded twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from selftune.config import load_pipeline
from selftune.runner import StageCache, Tracking, in_process, run_stages
from selftune.tracking import create_run, ensure_experiment, finish_run
from support import REPO


def tiny_pipeline(data: Path):
    sets = ["stages.supervised.epochs=1", "stages.supervised.steps_per_epoch=1", "stages.self_train.epochs=1",
            "stages.self_train.steps_per_epoch=1", "stages.pseudo_label.threshold=0.0", "data.crop_size=16",
            f"data.root={data}"]
    return load_pipeline(REPO / "pipelines" / "quickstart.yaml", sets)


def session(pipeline, cache: StageCache, tracking: Tracking, storage: Path) -> list:
    return run_stages(pipeline, store=cache, execute=in_process(pipeline.resources, storage=lambda job: storage),
                      tracking=tracking)


@pytest.mark.slow
def test_a_parent_run_again_keeps_one_finished_run_per_stage(tmp_path, tracking_uri, small_synthetic):
    pipeline = tiny_pipeline(small_synthetic)
    experiment = ensure_experiment(tracking_uri, "resumed")
    trial = create_run(tracking_uri, experiment, name="trial", kind="trial")
    tracking = Tracking(tracking_uri, experiment, trial, tags={})
    cache = StageCache(tmp_path / "cache")
    first = session(pipeline, cache, tracking, tmp_path / "ray")
    again = session(pipeline, cache, tracking, tmp_path / "ray")  # the same trial's next session, done=0
    finish_run(tracking_uri, trial, "FINISHED")

    runs = MlflowClient(tracking_uri).search_runs([experiment], filter_string="tags.`selftune.kind` = 'stage'")
    per_stage = sorted((run.data.tags["selftune.stage"], run.info.status) for run in runs)
    assert per_stage == sorted((stage.name, "FINISHED") for stage in pipeline.stages)
    assert [r.run_id for r in again] == [r.run_id for r in first]  # each stage's own run, kept
    assert [r.summary for r in again] == [r.summary for r in first]
    assert [r.hit for r in again] == [False] * len(pipeline.stages)  # computed by this trial, not reused from another
    parent = MlflowClient(tracking_uri).get_metric_history(trial, "supervised/val/miou")
    assert len(parent) == 1  # the parent's per-stage point is not logged twice
