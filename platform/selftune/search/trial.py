"""One Tune trial: the stage runner (``selftune.runner``) over the pipeline with the sampled values,
the stage cache as its store, and a Tune report after every stage.

The trial function is the Ray 2.60 pattern (a plain function that fits a ``TorchTrainer`` per
stage and calls ``ray.tune.report`` after each). Two details keep it cheap on small machines:

* Ray Train's local mode refuses to run inside a Tune session (its ``ray.train.*`` calls raise),
  so a ``workers: 0`` stage runs its local-mode ``TorchTrainer.fit()`` inside a Ray task: a pooled
  worker process, ~0.1 s to start instead of 13-30 s for a worker group.
* The stage cache: a stage already computed with the same effective inputs is reused.

After every stage the trial reports ``stage`` (1-based), ``objective`` (the objective metric if
this stage produced it, else the latest training stage's ``select/miou``: comparable across
trials at the same rung) and ``rung``, ASHA's time attribute: the stages done that measured the
objective afresh (``rung_stages``). A labelling stage that does not measure it adds no rung, so
ASHA never cuts trials twice on the same supervised value.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selftune.config import PipelineConfig, ResourcesConfig, TrainingStageConfig, pipeline_to_dict
from selftune.errors import SelftuneError, failure_reason
from selftune.runner import StageCache, StageResult, Tracking, in_process, run_stages, terminates
from selftune.search import pbt
from selftune.search.space import SearchSpace
from selftune.stages import StageJob
from selftune.tracking import RunTracker, attempt, client, create_run, not_logged, take_not_logged, write_not_logged

KIND_TRIAL = "trial"
OBJECTIVE = "objective"  # the Tune / Optuna metric name
STAGE = "stage"  # stages completed
RUNG = "rung"  # ASHA's time attribute: stages completed that measured the objective afresh (rung_stages)
TRIAL_ACTOR_CPUS = 0.01  # what a trial's own actor reserves (Tune refuses 0); it only waits on its stages
OWN_ERRORS = "trial_errors"  # in the search folder: <trial id>.txt, why a trial failed when not by Ray's doing


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the search driver (pickled into each trial)."""

    space: SearchSpace
    tracking_uri: str
    experiment_id: str
    search_run_id: str
    cache_root: str
    not_logged_dir: str = ""  # each trial writes what it could not log to <dir>/<trial id>.json
    own_errors_dir: str = ""  # see own_error_file
    pbt_dir: str = ""  # PBT: <dir>/<trial id>.json, each trial's realised values and exploits
    store_owner: str = ""  # how the trials name the search in the stage store's records (its disk budget's)


def objective_value(metric: str, stage: StageResult, latest_select: float | None) -> float | None:
    """The objective after ``stage``: ``metric`` itself when this stage logged it (``select/miou``
    or ``<stage>/<key>``), else the latest training stage's ``select/miou`` — never the reported
    ``val/miou`` unless the space asks for it by name."""
    own = stage.summary.get(metric)
    if own is None and metric.startswith(f"{stage.name}/"):
        own = stage.summary.get(metric.removeprefix(f"{stage.name}/"))
    return own if own is not None else latest_select


def rung_stages(pipeline: PipelineConfig, objective: str) -> list[bool]:
    """Per stage: whether it measures the objective afresh, so ASHA may compare trials after it —
    a training stage (``select/miou`` of its own checkpoint), a stage whose own metric the
    objective names (``pseudo_label/miou``), and the last stage (the final value)."""
    last = len(pipeline.stages) - 1
    return [isinstance(stage, TrainingStageConfig) or objective.startswith(f"{stage.name}/") or index == last
            for index, stage in enumerate(pipeline.stages)]


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable."""
    import ray.tune

    space = context.space
    trial_id = ray.tune.get_context().get_trial_id()
    state = read_state(ray.tune.get_checkpoint())
    overrides = pbt.realised_overrides(space, config, state.get("realised", {})) if pbt.is_population_search(space) else {}
    pipeline = space.pipeline_for(config, overrides=overrides)
    done = state.get("stages_done", 0)
    own_error = own_error_file(context.own_errors_dir, trial_id)
    if own_error.is_file():  # Tune restarts every failed trial; this one would only fail again
        raise TrialFailed(own_error.read_text())
    mark = len(not_logged())
    try:
        _run_stages(config, context, trial_id, pipeline, TrialState(done, state, overrides))
    except Exception as error:
        if not lost_by_ray(error):
            own_error.parent.mkdir(parents=True, exist_ok=True)
            own_error.write_text(failure_reason(error))
        raise
    finally:  # hand over to the search driver what this trial (and its stages' workers) could not log
        if context.not_logged_dir and len(not_logged()) > mark:
            write_not_logged(Path(context.not_logged_dir) / f"{trial_id}.json", take_not_logged(mark))


class TrialFailed(SelftuneError):
    """A restarted trial whose previous attempt failed by an error of its own (the message is that error's)."""


def own_error_file(folder: str, trial_id: str) -> Path:
    """Where a trial records an error of its own, so that Tune's restart of it fails at once. In the
    search folder: a Tune trial's folder is a per-session staging copy that a resume does not see."""
    return Path(folder) / f"{trial_id}.txt"


def lost_by_ray(error: BaseException) -> bool:
    """Ray lost a process (a killed worker or actor, a lost node) or an object: a restart may
    succeed. An error that the trial's or a stage's own code raised (Ray wraps those in
    ``RayTaskError``) would only happen again."""
    from ray.exceptions import RayError, RayTaskError

    return isinstance(error, RayError) and not isinstance(error, RayTaskError)


@dataclass(frozen=True)
class TrialState:
    """Where a (re)started trial begins: stages done, the checkpoint it was restored from (its own,
    or under PBT a donor's), and the explicit per-round schedules it runs (PBT only)."""

    done: int
    checkpoint: dict[str, Any]
    overrides: dict[str, Any]


def _run_stages(config: dict[str, Any], context: TrialContext, trial_id: str, pipeline: PipelineConfig, start: TrialState) -> None:
    space = context.space
    trial_run_id, reported = _trial_run(context, trial_id, config, pipeline)
    tracker = RunTracker(context.tracking_uri, trial_run_id)
    # Without the shared cache a trial still caches for itself, so a resumed trial skips its done stages.
    cache = StageCache(context.cache_root if space.config.stage_cache else Path(context.cache_root) / trial_id,
                       owner=context.store_owner or None)
    population = PopulationTrial(context, trial_id, config, start, tracker) if pbt.is_population_search(space) else None

    def report(result: StageResult, results: list[StageResult]) -> None:
        state = {"trial_id": trial_id}
        metrics = population.after_stage(pipeline, result, results) if population else {}
        if population:
            state["realised"] = population.realised
        report_stage(result, results, pipeline, space.config.objective.metric, tracker, trial_run_id, state=state,
                     extra=metrics, logged=result.index in reported)

    with terminates(context.tracking_uri, trial_run_id):
        run_stages(
            pipeline, store=cache, execute=lambda job: execute_stage(job, pipeline.resources),
            tracking=Tracking(context.tracking_uri, context.experiment_id, trial_run_id, tags={"selftune.trial_id": trial_id}),
            done=start.done, on_stage_end=report,
        )


def report_stage(
    result: StageResult, results: list[StageResult], pipeline: PipelineConfig, objective: str,
    tracker: RunTracker, trial_run_id: str | None, *, state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
    logged: bool = False,
) -> None:
    """After a stage: the trial run's metrics and the Tune report (ASHA's rung, the objective),
    with a checkpoint of ``state`` (stages done, and what a restart needs besides). ``logged``: an
    earlier session logged this stage's trial metrics already (it ended before Tune's snapshot
    saw the report), so only Tune hears it again."""
    import ray.tune

    index = result.index
    trained = [r.summary for r in results if "val/miou" in r.summary]
    latest_val = trained[-1]["val/miou"] if trained else None
    latest_select = trained[-1].get("select/miou", latest_val) if trained else None
    hits = sum(r.hit and not r.resumed for r in results)  # reuses this session made
    value = objective_value(objective, result, latest_select)
    metrics = {
        STAGE: index + 1, "stages_total": len(pipeline.stages), RUNG: sum(rung_stages(pipeline, objective)[:index + 1]),
        "cache_hits": hits, "cache_hit": int(result.hit),
        "trial_run_id": trial_run_id or "",
        **({"select/miou": latest_select, "val/miou": latest_val} if trained else {}),
        **{f"{result.name}/{k}": v for k, v in result.summary.items() if isinstance(v, (int, float))},
        **(extra or {}),
    }
    if value is not None and math.isfinite(value):
        metrics[OBJECTIVE] = value
    if not logged:
        tracker.log_metrics({"cache_hits": hits, **({OBJECTIVE: metrics[OBJECTIVE]} if OBJECTIVE in metrics else {})}, step=index)
        if index == len(pipeline.stages) - 1 and latest_val is not None:
            tracker.log_metrics({"val/miou": latest_val, "select/miou": latest_select})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "state.json").write_text(json.dumps({**(state or {}), "stages_done": index + 1}))
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def execute_stage(job: StageJob, resources: ResourcesConfig) -> None:
    """Run a stage from inside a Tune trial: worker groups directly, local mode in a Ray task."""
    import ray

    if resources.workers > 0:
        return in_process(resources, storage=lambda j: Path(j.output_dir) / "ray")(job)
    # "DEFAULT": schedule on the cluster's CPUs, not inside the trial's placement group.
    options = {"num_cpus": local_stage_cpus(resources), "scheduling_strategy": "DEFAULT"}
    task = ray.remote(_run_local_stage).options(**options)
    ray.get(task.remote(job, resources))


def local_stage_cpus(resources: ResourcesConfig) -> float:
    """CPUs a trial's local-mode stage task asks Ray for: its share less what the trial actor
    holds, so N one-CPU trials run N stages at once on N CPUs (a whole CPU each left every
    second stage queued behind the first)."""
    return max(resources.cpus_per_worker - TRIAL_ACTOR_CPUS, resources.cpus_per_worker / 2)


def _run_local_stage(job: StageJob, resources: ResourcesConfig) -> None:
    import torch

    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))  # the task's CPU share, not the machine's
    in_process(resources, storage=lambda j: Path(j.output_dir) / "ray")(job)


def read_state(checkpoint) -> dict[str, Any]:
    """The state a trial reported with its last stage (``{}`` before its first)."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "state.json").read_text())


class PopulationTrial:
    """A PBT trial's bookkeeping: its realised per-round values, the exploit it was restarted by
    (if any), and MLflow's view of both (``schedule/<name>`` per round, ``selftune.pbt.exploits``)."""

    def __init__(self, context: TrialContext, trial_id: str, config: dict[str, Any], start: TrialState, tracker: RunTracker):
        self.space, self.trial_id, self.config, self.tracker = context.space, trial_id, config, tracker
        self.folder, self.overrides = context.pbt_dir, start.overrides
        self.group, self.rounds = pbt.searched_group(self.space)
        self.record = pbt.read_trial_record(self.folder, trial_id) or {"exploits": []}
        self.realised = start.checkpoint.get("realised", {})
        self.exploit: dict[str, Any] | None = None
        donor = start.checkpoint.get("trial_id")
        rounds = len(next(iter(self.realised.values()), []))
        # Restored from another trial's checkpoint: an exploit, unless this is the same one again
        # (the trial was interrupted before it reported on top of the donor's checkpoint).
        last = (self.record["exploits"] or [{}])[-1]
        if donor and donor != trial_id and (last.get("round"), last.get("donor")) != (rounds, donor):
            changes = pbt.changed_values(self.record.get("config", {}), config, pbt.mutable_values(self.space))
            self.exploit = {"round": rounds, "donor": donor, "changes": changes}
            self.record["exploits"].append(self.exploit)
            tracker.set_tags({"selftune.pbt.exploits": "; ".join(
                f"round {e['round']}: from trial {e['donor']} ({e['changes']})" for e in self.record["exploits"])})
        self._save()

    def after_stage(self, pipeline: PipelineConfig, result: StageResult, results: list[StageResult]) -> dict[str, Any]:
        """The Tune metrics PBT needs (``round``); logs each finished round's values."""
        done = pbt.rounds_done(pipeline, result.index, self.group)
        finished_round = done > len(next(iter(self.realised.values()), []))
        self.realised = pbt.realised_after(self.overrides, self.space, done)
        if finished_round:
            self.tracker.log_metrics({f"schedule/{path}": values[-1] for path, values in self.realised.items()}, step=done)
            self.record.setdefault("rounds", []).append(pbt.round_summary(done, results, self.group))
        self._save()
        burn_in = self.space.config.scheduler.burn_in
        metrics: dict[str, Any] = {pbt.ROUND: done} if pbt.reports_round(done, burn_in, self.rounds) else {}
        if self.exploit:  # the first report after an exploit: the driver prints it
            metrics.update(exploited_from=self.exploit["donor"], exploit_changes=self.exploit["changes"],
                           exploit_round=self.exploit["round"])
            self.exploit = None
        return metrics

    def _save(self) -> None:
        self.record.update(config=self.config, realised=self.realised,
                           schedule=pbt.schedule_fragment(self.space, self.config, self.realised))
        pbt.write_trial_record(self.folder, self.trial_id, self.record)


def _trial_run(context: TrialContext, trial_id: str, config: dict[str, Any], pipeline: PipelineConfig) -> tuple[str | None, set[int]]:
    """The trial's MLflow run and the stage indices it has reported (``cache_hits`` steps); a
    resumed trial finds and reopens its run instead of making a second. None when the server went
    away (the trial runs untracked; see selftune.tracking.runs)."""
    mlflow = client(context.tracking_uri)
    existing = attempt(lambda: mlflow.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`selftune.trial_id` = '{trial_id}' and tags.`selftune.kind` = '{KIND_TRIAL}' "
                      f"and tags.`mlflow.parentRunId` = '{context.search_run_id}'",
    ), context.tracking_uri, "read", f"look-up of trial {trial_id}'s run", run=None, default=[])
    if existing:
        run_id = existing[0].info.run_id

        def reopen() -> None:
            mlflow.update_run(run_id, status="RUNNING")
            if "selftune.error" in existing[0].data.tags:  # the interruption it records is over
                mlflow.delete_tag(run_id, "selftune.error")

        attempt(reopen, context.tracking_uri, "tag", "reopen as RUNNING", run=run_id)
        history = attempt(lambda: mlflow.get_metric_history(run_id, "cache_hits"), context.tracking_uri, "read",
                          f"read trial {trial_id}'s reported stages", run=run_id, default=[])
        return run_id, {point.step for point in history}
    run_id = create_run(
        context.tracking_uri, context.experiment_id, name=f"trial-{trial_id}", kind=KIND_TRIAL,
        parent_run_id=context.search_run_id,
        tags={"selftune.trial_id": trial_id, "selftune.pipeline": pipeline.name}, required=False,
    )
    tracker = RunTracker(context.tracking_uri, run_id)
    tracker.log_params(config)  # only the sampled values, by their dotted names: what the UI compares
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(yaml.safe_dump(pipeline_to_dict(pipeline), sort_keys=False))
        tracker.log_artifact(path)
    return run_id, set()
