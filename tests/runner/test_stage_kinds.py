"""Every registered stage kind: its config and function agree, its references are typed, and it
runs for one tiny step through the stage runner (in this process, without Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selftune.config import ARTIFACT_FOLDERS, StageConfig, load_pipeline, registered_kinds
from selftune.engine.context import WorkerContext
from selftune.runner import RunFolders, Tracking, run_stage_on_worker, run_stages
from selftune.tracking import RunTracker, create_run, ensure_experiment

TINY_TRAIN = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2}
TINY_PAIRED = {**TINY_TRAIN, "unlabelled_batch_size": 2}
ONE_VIEW = {"scales": [1.0], "flip": False}

# One pipeline that uses every kind once, each reading the artifacts it needs from earlier stages.
# A new kind must be added here: the parity test below fails until it is.
EVERY_KIND = [
    {"name": "sup", "kind": "supervised", **TINY_TRAIN},
    {"name": "snap", "kind": "supervised_snapshots", **TINY_TRAIN, "epochs": 2, "snapshots": 2},
    {"name": "pl", "kind": "pseudo_label", "model_from": "sup"},
    {"name": "st", "kind": "self_train", "init_from": "sup", **TINY_PAIRED},
    {"name": "cbl", "kind": "class_balanced_label", "model_from": "sup", "alpha": 0.5},
    {"name": "dst", "kind": "dst_train", "init_from": "sup", **TINY_PAIRED},
    {"name": "tta", "kind": "tta_label", "model_from": "sup", **ONE_VIEW},
    {"name": "saug", "kind": "saug_dsbn_train", "init_from": "sup", **TINY_PAIRED},
    {"name": "sel", "kind": "stability_select", "model_from": "snap", **ONE_VIEW},
    {"name": "retrain", "kind": "st_retrain", **TINY_PAIRED},
    {"name": "relabel", "kind": "relabel_unreliable", "keep_from": "sel", **ONE_VIEW},
    {"name": "aux", "kind": "aux_confidence", "model_from": "sup", **TINY_TRAIN, "channels": [4, 4, 4], "aspp_channels": 4},
    {"name": "conf", "kind": "confidence_label", "aux_from": "aux", "model_from": "sup", "t_aux": 0.0},
    {"name": "mt", "kind": "multi_task", "pseudo_labels": "pl", **TINY_PAIRED},
    {"name": "u2", "kind": "u2pl", "init_from": "sup", **TINY_PAIRED, "num_queries": 4, "num_negatives": 2,
     "memory_size": 16, "feature_dim": 4},
]


def test_every_registered_kind_is_exercised_and_its_config_names_it():
    kinds = registered_kinds()
    assert {kind.name for kind in kinds} == {stage["kind"] for stage in EVERY_KIND}
    produced = {artifact for kind in kinds for artifact in kind.config.produces}
    for kind in kinds:
        assert issubclass(kind.config, StageConfig) and callable(kind.run)
        assert kind.config.model_fields["kind"].default == kind.name
        assert kind.config.produces <= set(ARTIFACT_FOLDERS), kind.name
        for field, reference in kind.config.reference_fields().items():
            assert reference.artifact in produced, f"{kind.name}.{field} reads {reference.artifact}, which no kind produces"


@pytest.fixture(scope="module")
def every_kind_run(tmp_path_factory, small_synthetic):
    root = tmp_path_factory.mktemp("kinds")
    source = root / "every_kind.yaml"
    source.write_text(yaml.safe_dump({
        "name": "every_kind", "data": {"dataset": "folder", "root": str(small_synthetic), "labelled": 8,
                                        "crop_size": 32, "eval_batch_size": 16},
        "model": {"name": "small_segnet", "options": {"width": 8}}, "stages": EVERY_KIND,
    }))
    pipeline = load_pipeline(source)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = ensure_experiment(uri, "kinds")
    parent = create_run(uri, experiment, name="every_kind", kind="pipeline")

    def execute(job):  # the worker function itself, in this process: what Ray Train runs per worker
        run_stage_on_worker(job, WorkerContext.local("cpu", tracker=RunTracker(uri, job.run_id)))

    results = run_stages(pipeline, store=RunFolders(root / "out"), execute=execute,
                         tracking=Tracking(uri, experiment, parent, tags={}))
    return {result.name: result for result in results}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [stage["name"] for stage in EVERY_KIND])
def test_each_kind_runs_one_tiny_step_and_leaves_its_artifacts(every_kind_run, stage):
    result = every_kind_run[stage]
    folder = Path(result.output_dir)
    assert (folder / "summary.json").is_file() and not (folder / "result.json").exists()
    config = next(kind.config for kind in registered_kinds() if kind.name == result.kind)
    for artifact in config.produces:
        assert (folder / ARTIFACT_FOLDERS[artifact]).is_dir(), f"{stage} did not write its {artifact}"
    if "model" in config.produces:
        assert 0.0 <= result.summary["val/miou"] <= 1.0
    if "pseudo_labels" in config.produces and stage != "sel":
        assert 0.0 <= result.summary["pseudo_label/kept_fraction"] <= 1.0
