"""The one stage runner: ``selftune run``, every search trial and ``selftune final`` run their
stages through ``run_stages``.

Given a pipeline, a stage store (a run's own folders, or the stage cache), an executor (in this
process through Ray Train, or from inside a Tune trial) and callbacks, it runs the stages in
order. For each stage it computes the cache key from the stage's config and its upstream keys,
builds the stage's inputs from its declared references, opens the nested MLflow run, executes the
stage, writes ``summary.json`` *last* from the stage's returned summary, and logs the per-stage
and per-round metrics on the parent run once.

MLflow contract (users' dashboards rely on these names):
- stage run: tags ``selftune.kind=stage``, ``selftune.stage``, ``selftune.stage_index``,
  ``selftune.stage_kind``, ``selftune.output_dir`` (+ ``selftune.group``/``round`` in a rounds
  group, ``selftune.cache=hit|miss`` with a cache); params = the stage's resolved config;
- parent run (pipeline or trial): ``<stage>/val/miou``, ``<stage>/pseudo_label/miou`` (+ kept
  fraction, coverage) with step = stage index, ``<group>/<inner stage>/<key>`` with step = round;
- every run ends FINISHED, FAILED (reason in tag ``selftune.error``) or KILLED — never RUNNING;
- one FINISHED stage run per (parent, stage), also across resumes: a resumed parent (a trial)
  keeps its FINISHED run of a stage the store still holds, and a stage computed again supersedes
  its earlier runs (tag ``selftune.superseded_by``, ended KILLED if they were not).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol

from selftune.config import PipelineConfig, ResourcesConfig, StageConfig, flatten, stage_kind
from selftune.config.kinds import reference_fields
from selftune.engine.context import WorkerContext
from selftune.engine.ray_train import POLL_ENV, WorkOrder, run_on_ray_train
from selftune.errors import failure_reason
from selftune.runner.cache import stage_key
from selftune.runner.fingerprints import pipeline_fingerprints
from selftune.stages import RESULT, SUMMARY, StageJob, artifact_path
from selftune.tracking import (
    KIND_STAGE,
    NOT_LOGGED,
    RunTracker,
    absorb_not_logged,
    attempt,
    client,
    create_run,
    finish_run,
)

SUMMARY_KEYS = ("select/miou", "val/miou", "pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage")

Executor = Callable[[StageJob], None]  # runs a stage's function on its workers (rank 0 leaves RESULT)


@dataclass
class StageResult:
    name: str
    kind: str
    output_dir: str
    run_id: str | None
    seconds: float
    summary: dict[str, Any]
    index: int = 0
    key: str = ""
    hit: bool = False  # reused from the stage store, not computed
    resumed: bool = False  # done before a resume: read back, not logged again
    kept: bool = False  # the parent's FINISHED run from an earlier session: not logged again


class StageStore(Protocol):
    def claim(self, index: int, stage_name: str, key: str, *, user: dict[str, Any] | None = None) -> ContextManager[tuple[Path, bool]]: ...


@dataclass(frozen=True)
class Tracking:
    """Where the stage runs go: the store, the experiment and the parent run (pipeline or trial)."""

    uri: str
    experiment_id: str
    parent_run_id: str | None
    tags: dict[str, Any]  # added to every stage run (e.g. the trial id)


def run_stages(
    pipeline: PipelineConfig,
    *,
    store: StageStore,
    execute: Executor,
    tracking: Tracking,
    done: int = 0,
    on_stage_start: Callable[[int, StageConfig], None] | None = None,
    on_stage_end: Callable[[StageResult, list[StageResult]], None] | None = None,
) -> list[StageResult]:
    """Run every stage in order; the first ``done`` stages (a resumed trial's) are read back
    from the store without touching MLflow, unless the store lost them. The store's entries
    stay held (no prune deletes them) until the last stage is done."""
    try:
        return _run_stages(pipeline, store, execute, tracking, done, on_stage_start, on_stage_end)
    finally:
        release = getattr(store, "release", None)
        if release:
            release()


def _run_stages(
    pipeline: PipelineConfig, store: StageStore, execute: Executor, tracking: Tracking, done: int,
    on_stage_start: Callable[[int, StageConfig], None] | None,
    on_stage_end: Callable[[StageResult, list[StageResult]], None] | None,
) -> list[StageResult]:
    parent = RunTracker(tracking.uri, tracking.parent_run_id)
    fingerprints = pipeline_fingerprints(pipeline)  # once per run: code and data as they are now
    user = {"run": tracking.parent_run_id, **{name.removeprefix("selftune."): value for name, value in tracking.tags.items()}}
    keys: dict[str, str] = {}
    folders: dict[str, Path] = {}
    results: list[StageResult] = []
    for index, stage in enumerate(pipeline.stages):
        upstream = stage.upstream()
        keys[stage.name] = key = stage_key(pipeline, index, {role: keys[name] for role, name in upstream.items()}, fingerprints)
        inputs = {role: str(artifact_path(folders[name], _artifact(stage, role))) for role, name in upstream.items()}
        if on_stage_start and index >= done:
            on_stage_start(index, stage)
        with store.claim(index, stage.name, key, user=user) as (folder, hit):
            folders[stage.name] = folder
            job = StageJob(pipeline=pipeline, stage_index=index, output_dir=str(folder), inputs=inputs,
                           tracking_uri=tracking.uri)
            earlier = earlier_stage_runs(tracking, stage.name) if index >= done else []
            kept = finished_run(earlier, key) if hit else None
            if index < done and hit:
                result = StageResult(stage.name, stage.kind, str(folder), None, 0.0, job.read_summary())
            elif kept is not None:  # a resumed trial whose last session ended after this stage
                result = StageResult(stage.name, stage.kind, str(folder), kept.info.run_id, 0.0, job.read_summary(), kept=True)
            elif hit:
                result = record_reused_stage(job, tracking, tags={"selftune.cache": "hit", "selftune.cache_key": key})
            else:
                result = run_tracked_stage(job, tracking, execute, tags={"selftune.cache": "miss", "selftune.cache_key": key})
            supersede(tracking.uri, [run for run in earlier if run is not kept], result.run_id)
        result.index, result.key, result.resumed = index, key, index < done
        result.hit = kept.data.tags.get("selftune.cache") == "hit" if kept is not None else hit
        results.append(result)
        if index < done:
            continue
        if not result.kept:  # a kept run's parent metrics were logged in its own session
            parent.log_metrics(pipeline_metrics(result), step=index)
        if stage.group:  # curricula: one series per group and inner stage, step = round
            parent.log_metrics(round_metrics(stage, result), step=stage.round)
        if on_stage_end:
            on_stage_end(result, results)
    return results


def earlier_stage_runs(tracking: Tracking, stage_name: str) -> list:
    """The parent's runs of the stage made in earlier sessions (a resumed trial): none for a new
    parent. A failed look-up is recorded as not logged and finds none."""
    if tracking.parent_run_id is None:
        return []
    where = (f"tags.`mlflow.parentRunId` = '{tracking.parent_run_id}' and tags.`selftune.kind` = '{KIND_STAGE}' "
             f"and tags.`selftune.stage` = '{stage_name}'")
    return attempt(lambda: client(tracking.uri).search_runs([tracking.experiment_id], filter_string=where),
                   tracking.uri, "read", f"look-up of stage {stage_name}'s earlier runs", run=tracking.parent_run_id,
                   default=[])


def finished_run(runs: list, key: str):
    """The FINISHED run of the stage with cache key ``key`` among ``runs``, if any."""
    return next((run for run in runs if run.info.status == "FINISHED"
                 and run.data.tags.get("selftune.cache_key") == key), None)


def supersede(tracking_uri: str, runs: list, by: str | None) -> None:
    """Earlier runs of a stage computed (or recorded) again: each names the run that replaces it,
    and one not yet ended KILLED or FAILED (left RUNNING by a killed process, or FINISHED with
    outputs since lost) is ended KILLED, so the parent has one FINISHED run of the stage."""
    for run in runs:
        run_id = run.info.run_id

        def mark(run=run, run_id=run_id) -> None:
            mlflow = client(tracking_uri)
            mlflow.set_tag(run_id, "selftune.superseded_by", by or "(untracked)")
            if run.info.status not in ("KILLED", "FAILED"):
                mlflow.set_tag(run_id, "selftune.error", "superseded: the stage was computed again after an interruption")
                mlflow.set_terminated(run_id, status="KILLED")

        attempt(mark, tracking_uri, "tag", f"mark as superseded by {by}", run=run_id)


def _artifact(stage: StageConfig, role: str) -> str:
    """The artifact a stage reads for ``role`` (from its reference field's declaration)."""
    return next(ref.artifact for ref in reference_fields(type(stage)).values() if ref.role == role)


def stage_tags(job: StageJob) -> dict[str, Any]:
    stage = job.stage
    return {
        "selftune.stage": stage.name, "selftune.stage_kind": stage.kind,
        "selftune.stage_index": job.stage_index, "selftune.output_dir": job.output_dir,
        **({"selftune.group": stage.group, "selftune.round": stage.round} if stage.group else {}),
    }


def run_tracked_stage(job: StageJob, tracking: Tracking, execute: Executor, *, tags: dict[str, Any] | None = None) -> StageResult:
    """Run one stage under its own MLflow run (nested under the parent); ``summary.json`` last."""
    stage = job.stage
    run_id = create_run(
        tracking.uri, tracking.experiment_id, name=stage.name, kind=KIND_STAGE, parent_run_id=tracking.parent_run_id,
        tags={**stage_tags(job), **tracking.tags, **(tags or {})}, required=False,
    )
    job = replace(job, run_id=run_id)  # run_id None (not created): workers log nothing
    started = time.perf_counter()
    try:
        with terminates(tracking.uri, run_id):
            RunTracker(tracking.uri, run_id).log_params(flatten(stage.model_dump(mode="json")))
            execute(job)
            summary = job.read_json(RESULT)
            job.write_json(SUMMARY, summary)  # last: a complete stage is one with a summary
            job.output(RESULT).unlink()
    finally:
        absorb_not_logged(job.output(NOT_LOGGED))  # what the stage's workers could not log
    return StageResult(stage.name, stage.kind, job.output_dir, run_id, time.perf_counter() - started, summary)


def record_reused_stage(job: StageJob, tracking: Tracking, *, tags: dict[str, Any] | None = None) -> StageResult:
    """A stage whose outputs already exist (a stage-cache hit): a FINISHED run with its params and
    the stored summary metrics, so every tree is complete in the UI."""
    stage = job.stage
    summary = job.read_summary()
    run_id = create_run(
        tracking.uri, tracking.experiment_id, name=stage.name, kind=KIND_STAGE, parent_run_id=tracking.parent_run_id,
        tags={**stage_tags(job), **tracking.tags, **(tags or {})}, required=False,
    )
    with terminates(tracking.uri, run_id):
        tracker = RunTracker(tracking.uri, run_id)
        tracker.log_params(flatten(stage.model_dump(mode="json")))
        tracker.log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float))})
    return StageResult(stage.name, stage.kind, job.output_dir, run_id, 0.0, summary)


def in_process(resources: ResourcesConfig, *, storage: Callable[[StageJob], Path]) -> Executor:
    """Run each stage as one Ray Train ``fit()`` started from this process (local mode for
    ``workers: 0``); ``storage(job)`` is Ray Train's storage folder for the stage."""

    def execute(job: StageJob) -> None:
        order = WorkOrder(run_stage_on_worker, job, job.output_dir, job.tracking_uri, job.run_id)
        run_on_ray_train(order, resources, name=Path(job.output_dir).name, storage_path=storage(job))

    return execute


def run_stage_on_worker(job: StageJob, ctx: WorkerContext) -> None:
    """What every Ray Train worker runs: the kind's function; rank 0 hands its summary back."""
    import torch

    summary = stage_kind(job.stage.kind).run(job, ctx)
    if ctx.is_main and ctx.restartable:  # whether Ray Train had to restart the worker group, and from where
        summary = {**summary, "restarts": ctx.attempt - 1, "resumed_from_epoch": ctx.resumed_from_epoch,
                   "torch_threads": torch.get_num_threads(),
                   "controller_poll_s": float(os.environ.get(POLL_ENV, "nan"))}  # what reached the worker
    if ctx.is_main:
        job.write_json(RESULT, summary)


def pipeline_metrics(stage: StageResult) -> dict[str, float]:
    return {f"{stage.name}/{key}": stage.summary[key] for key in SUMMARY_KEYS if key in stage.summary}


def round_metrics(stage: StageConfig, result: StageResult) -> dict[str, float]:
    inner = stage.name.removeprefix(f"{stage.group}-r{stage.round}-")
    return {f"{stage.group}/{inner}/{key}": result.summary[key] for key in SUMMARY_KEYS if key in result.summary}


@contextmanager
def terminates(tracking_uri: str, run_id: str | None) -> Iterator[None]:
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
        finish_run(tracking_uri, run_id, "FAILED", reason=failure_reason(error))
        raise
    else:
        finish_run(tracking_uri, run_id, "FINISHED")
