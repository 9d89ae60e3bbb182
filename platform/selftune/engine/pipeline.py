"""The driver: run a pipeline's stages in order, each as one Ray Train run, under one MLflow
pipeline run with a nested run per stage.

MLflow contract (users' dashboards rely on these names):
- pipeline run: tag ``selftune.kind=pipeline``; params = the resolved pipeline, flattened;
  artifact ``pipeline.yaml``; metrics ``val/miou`` (last training stage) and, per stage,
  ``<stage>/val/miou`` and ``<stage>/pseudo_label/miou`` (+ kept fraction, coverage).
- stage run: tags ``selftune.kind=stage``, ``selftune.stage``, ``selftune.stage_index``,
  ``selftune.output_dir``; params = the stage's resolved config; metrics logged by the stage.
- every run ends FINISHED, FAILED (reason in tag ``selftune.error``) or KILLED — never RUNNING.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from selftune.config import PipelineConfig, flatten, pipeline_to_dict
from selftune.errors import ConfigError
from selftune.stages import ARTIFACT_OF_ROLE, StageJob
from selftune.stages.data import prepare_data
from selftune.tracking import (
    KIND_PIPELINE, KIND_STAGE, NOT_LOGGED, RunTracker, absorb_not_logged, create_run, ensure_experiment, finish_run,
    require_reachable,
)

SUMMARY_KEYS = ("val/miou", "pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage")


@dataclass
class StageResult:
    name: str
    kind: str
    output_dir: str
    run_id: str
    seconds: float
    summary: dict[str, Any]


@dataclass
class PipelineResult:
    run_id: str
    output_dir: str
    stages: list[StageResult] = field(default_factory=list)

    @property
    def val_miou(self) -> float | None:
        values = [s.summary["val/miou"] for s in self.stages if "val/miou" in s.summary]
        return values[-1] if values else None


def new_output_dir(out: str | Path | None, pipeline_name: str) -> Path:
    """A fresh folder for this run's outputs; an existing non-empty ``--out`` is refused so no
    earlier results are overwritten."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{pipeline_name}-{stamp}"
        suffix = 1
        while out.exists():
            suffix += 1
            out = Path("runs") / f"{pipeline_name}-{stamp}-{suffix}"
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: folder exists and is not empty; choose a new folder so earlier results stay intact")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_pipeline(
    pipeline: PipelineConfig,
    *,
    out: str | Path | None,
    tracking_uri: str,
    experiment: str | None = None,
    on_stage_start: Callable[[int, Any], None] | None = None,
    on_stage_end: Callable[[StageResult], None] | None = None,
    kind: str = KIND_PIPELINE,
    tags: dict[str, Any] | None = None,
) -> PipelineResult:
    """Validate inputs, then run every stage; MLflow runs end FAILED/KILLED if anything goes wrong."""
    from selftune.engine.ray_train import run_stage

    require_reachable(tracking_uri)  # fail fast on a tracking server that does not answer
    prepare_data(pipeline.data, pipeline.seed)  # fail fast on a bad dataset, before any run exists
    output_dir = new_output_dir(out, pipeline.name)
    resolved = pipeline_to_dict(pipeline)
    (output_dir / "pipeline.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    experiment_id = ensure_experiment(tracking_uri, experiment or pipeline.name)
    run_id = create_run(
        tracking_uri, experiment_id, name=pipeline.name, kind=kind,
        tags={"selftune.pipeline": pipeline.name, "selftune.output_dir": str(output_dir), **(tags or {})},
    )
    tracker = RunTracker(tracking_uri, run_id)
    result = PipelineResult(run_id=run_id, output_dir=str(output_dir))
    with terminates(tracking_uri, run_id):
        tracker.log_params(flatten(resolved))
        tracker.log_artifact(output_dir / "pipeline.yaml")
        stage_dirs: dict[str, Path] = {}
        for index, stage in enumerate(pipeline.stages):
            if on_stage_start:
                on_stage_start(index, stage)
            stage_dir = output_dir / f"{index}-{stage.name}"
            stage_dir.mkdir()
            stage_dirs[stage.name] = stage_dir
            job = StageJob(
                pipeline=pipeline, stage_index=index, output_dir=str(stage_dir),
                inputs={role: str(stage_dirs[name] / ARTIFACT_OF_ROLE[role]) for role, name in stage.upstream().items()},
                tracking_uri=tracking_uri,
            )
            stage_result = _run_stage(job, experiment_id, run_id, output_dir, run_stage, pipeline)
            result.stages.append(stage_result)
            tracker.log_metrics(pipeline_metrics(stage_result), step=index)
            if stage.group:  # curricula: one series per group and inner stage, step = round
                tracker.log_metrics(round_metrics(stage, stage_result), step=stage.round)
            if on_stage_end:
                on_stage_end(stage_result)
        if result.val_miou is not None:
            tracker.log_metrics({"val/miou": result.val_miou})
    return result


def _run_stage(job: StageJob, experiment_id: str, parent_run_id: str, output_dir: Path, run_stage, pipeline) -> StageResult:
    return run_tracked_stage(job, experiment_id, parent_run_id, lambda j: run_stage(j, pipeline.resources, storage_path=output_dir / "ray"))


def stage_tags(job: StageJob) -> dict[str, Any]:
    stage = job.stage
    return {
        "selftune.stage": stage.name, "selftune.stage_kind": stage.kind,
        "selftune.stage_index": job.stage_index, "selftune.output_dir": job.output_dir,
        **({"selftune.group": stage.group, "selftune.round": stage.round} if stage.group else {}),
    }


def run_tracked_stage(
    job: StageJob, experiment_id: str, parent_run_id: str, execute: Callable[[StageJob], dict[str, Any]],
    *, tags: dict[str, Any] | None = None,
) -> StageResult:
    """Run one stage under its own MLflow run (nested under ``parent_run_id``)."""
    stage = job.stage
    run_id = create_run(
        job.tracking_uri, experiment_id, name=stage.name, kind=KIND_STAGE, parent_run_id=parent_run_id,
        tags={**stage_tags(job), **(tags or {})}, required=False,
    )
    job = StageJob(**{**job.__dict__, "run_id": run_id})  # run_id None (not created): workers log nothing
    started = time.perf_counter()
    try:
        with terminates(job.tracking_uri, run_id):
            RunTracker(job.tracking_uri, run_id).log_params(flatten(stage.model_dump(mode="json")))
            summary = execute(job)
    finally:
        absorb_not_logged(job.output(NOT_LOGGED))  # what the stage's workers could not log
    return StageResult(stage.name, stage.kind, job.output_dir, run_id, time.perf_counter() - started, summary)


def record_reused_stage(job: StageJob, experiment_id: str, parent_run_id: str, *, tags: dict[str, Any] | None = None) -> StageResult:
    """A stage whose outputs already exist (a stage-cache hit): a FINISHED run with its params and
    the stored summary metrics, so every trial's tree is complete in the UI."""
    stage = job.stage
    summary = job.read_summary()
    run_id = create_run(
        job.tracking_uri, experiment_id, name=stage.name, kind=KIND_STAGE, parent_run_id=parent_run_id,
        tags={**stage_tags(job), **(tags or {})}, required=False,
    )
    with terminates(job.tracking_uri, run_id):
        tracker = RunTracker(job.tracking_uri, run_id)
        tracker.log_params(flatten(stage.model_dump(mode="json")))
        tracker.log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float))})
    return StageResult(stage.name, stage.kind, job.output_dir, run_id, 0.0, summary)


def pipeline_metrics(stage: StageResult) -> dict[str, float]:
    return {f"{stage.name}/{key}": stage.summary[key] for key in SUMMARY_KEYS if key in stage.summary}


def round_metrics(stage, result: StageResult) -> dict[str, float]:
    inner = stage.name.removeprefix(f"{stage.group}-r{stage.round}-")
    return {f"{stage.group}/{inner}/{key}": result.summary[key] for key in SUMMARY_KEYS if key in result.summary}


@contextmanager
def terminates(tracking_uri: str, run_id: str) -> Iterator[None]:
    """End the run FINISHED on success, KILLED on Ctrl-C, FAILED (with the reason) otherwise.
    ``SystemExit(0)`` is a success: Ray Tune ends a trial that way once it has reported enough."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code in (0, None):
            finish_run(tracking_uri, run_id, "FINISHED")
        else:
            finish_run(tracking_uri, run_id, "FAILED", reason=f"SystemExit: {exit_.code}")
        raise
    except KeyboardInterrupt:
        finish_run(tracking_uri, run_id, "KILLED", reason="interrupted")
        raise
    except BaseException as error:
        finish_run(tracking_uri, run_id, "FAILED", reason=f"{type(error).__name__}: {error}")
        raise
    else:
        finish_run(tracking_uri, run_id, "FINISHED")
