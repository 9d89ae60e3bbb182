"""``selftune search``: Ray Tune drives an Optuna sampler over a pipeline's values.

The driver resolves the MLflow store once, creates (or, on ``--resume``, reopens) the search run,
and fits a ``ray.tune.Tuner`` whose trials are ``selftune.search.trial.run_trial``. Optuna's study
lives in ``<folder>/optuna.db`` and Tune's experiment in ``<folder>/tune``; ``Tuner.restore``
brings both back, so a resumed search neither loses nor repeats trials.

A tracking server that goes away mid-search does not stop it (see ``selftune.tracking.runs``):
trials run untracked, the trial table is completed from Tune's own results, and what MLflow did
not get (from the driver, the trials and their stages' workers) ends up in ``<folder>/not_logged.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from selftune.config import flatten
from selftune.errors import ConfigError
from selftune.interrupts import sigterm_as_interrupt
from selftune.runner.cache import default_store_root, stage_keys
from selftune.search.disk_budget import DiskBudget, search_owner
from selftune.search import pbt
from selftune.search.space import SearchSpace
from selftune.search.summary import (
    KIND_SEARCH, TrialRow, best_line, best_row, find_search_run, format_rows, merge_rows, plot_search, reported_rows, trial_rows, write_csv,
)
from selftune.search.dashboard import dashboard_line
from selftune.search.callbacks import Progress, TrialRunCloser, close_open_runs
from selftune.search.pins import pin_best_trial
from selftune.search.searcher import StageAwareOptunaSearch
from selftune.search.trial import OBJECTIVE, OWN_ERRORS, RUNG, TRIAL_ACTOR_CPUS, TrialContext, rung_stages, run_trial
from selftune.tracking import (
    NOT_LOGGED, RunTracker, absorb_not_logged, attempt, client, create_run, describe_not_logged, ensure_experiment,
    finish_run, not_logged, offline, require_reachable, take_not_logged, write_not_logged,
)

STATE = "search.json"  # in the search folder: what --resume needs
TUNE_SNAPSHOT_PERIOD_S = 1  # how often Tune saves its experiment state (see _fit)
PBT_RECORDS = "pbt"  # in the search folder: <trial id>.json of each PBT trial (selftune.search.pbt)
BEST_SCHEDULE = "best_schedule.yaml"


@dataclass
class SearchOutcome:
    run_id: str
    folder: Path
    rows: list[TrialRow]
    best: TrialRow | None
    not_logged: list[dict[str, Any]] = field(default_factory=list)  # what MLflow did not get


def search_folder(space: SearchSpace, out_root: str | Path, resume: bool) -> Path:
    """A new ``<out_root>/search-<name>-<time>`` folder, or with ``resume`` the latest one."""
    root = Path(out_root).resolve()
    if resume:
        candidates = sorted(root.glob(f"search-{space.name}-*/{STATE}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"--resume: no earlier search of {space.source} under {root} (looked for search-{space.name}-*/{STATE})")
        return candidates[-1].parent
    folder = root / f"search-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = root / f"search-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    folder.mkdir(parents=True)
    return folder


def run_search(
    space: SearchSpace,
    *,
    tracking_uri: str,
    out_root: str | Path = "runs",
    resume: bool = False,
    experiment: str | None = None,
    progress: Callable[[str], None] = print,
    store: str | Path | None = None,
) -> SearchOutcome:
    """``store``: the stage store the trials share (default ``default_store_root()``; a resumed
    search keeps the one it started with)."""
    require_reachable(tracking_uri)  # fail fast, before any folder or run exists
    folder = search_folder(space, out_root, resume)
    state = _open_search_run(space, folder, tracking_uri, experiment, resume, store)
    state.setdefault("store", str(folder / "stage-cache"))  # resumed from before the shared store: where its stages are
    run_id = state["search_run_id"]
    progress(f"search {space.name}: folder {folder}; MLflow search run {run_id}")
    started = time.monotonic()
    mark = len(not_logged())
    try:
        results, ended_ids = _fit(space, folder, state, tracking_uri, resume, progress)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            close_open_runs(tracking_uri, state["experiment_id"], run_id, "KILLED", "interrupted")
            finish_run(tracking_uri, run_id, "KILLED", reason="interrupted; continue with --resume")
        else:
            close_open_runs(tracking_uri, state["experiment_id"], run_id, "FAILED", f"search failed: {error}")
            finish_run(tracking_uri, run_id, "FAILED", reason=f"{type(error).__name__}: {error}")
        _say(save_not_logged(folder, mark), folder, tracking_uri, progress)
        raise
    # MLflow's trial table, completed from Tune's own results (all of them when MLflow is away).
    logged = [] if offline() else attempt(lambda: trial_rows(tracking_uri, client(tracking_uri).get_run(run_id)),
                                          tracking_uri, "read", "read the trial runs back", run=run_id, default=[])
    _gather_trials_not_logged(folder)
    rows = merge_rows(logged, reported_rows(results), prefer_reported=len(not_logged()) > mark or offline())
    ended = len(ended_ids or ())
    if _interrupted(space, ended, started):
        # Tune ends fit() quietly on Ctrl-C (and SIGTERM), after saving its state: say so, and keep it resumable.
        reason = f"interrupted after {ended} of {expected_trials(space)} trials; continue with --resume"
        close_open_runs(tracking_uri, state["experiment_id"], run_id, "KILLED", reason, ended_trials=ended_ids)
        finish_run(tracking_uri, run_id, "KILLED", reason=reason)
        _say(save_not_logged(folder, mark), folder, tracking_uri, progress)
        raise KeyboardInterrupt(reason)
    best = best_row(rows, space.config.objective.mode)
    _log_search_results(space, folder, tracking_uri, run_id, rows, best)
    pin_best_trial(space, folder, best, state["store"])
    finish_run(tracking_uri, run_id, "FINISHED")
    return SearchOutcome(run_id, folder, rows, best, save_not_logged(folder, mark))


def _gather_trials_not_logged(folder: Path) -> None:
    """Move what the trials could not log (their files in ``<folder>/not_logged/``) into this process's journal."""
    for path in sorted((folder / "not_logged").glob("*.json")):
        absorb_not_logged(path)


def save_not_logged(folder: Path, mark: int) -> list[dict[str, Any]]:
    """Everything not logged during this search (driver and trials), added to ``<folder>/not_logged.json``."""
    _gather_trials_not_logged(folder)
    items = take_not_logged(mark)
    if items:
        write_not_logged(folder / NOT_LOGGED, items)
    return items


def _say(items: list[dict[str, Any]], folder: Path, tracking_uri: str, progress) -> None:
    if items:
        progress(describe_not_logged(items, tracking_uri, folder / NOT_LOGGED))


def expected_trials(space: SearchSpace) -> int:
    budget = space.trial_budget
    if space.config.searcher.name == "grid":
        sizes = [len(values) for values in space.grid().values()]
        return min(budget, math.prod(sizes))
    return budget


def _interrupted(space: SearchSpace, ended: int, started: float) -> bool:
    """``ended``: trials Tune saw finish, stop or fail (a trial interrupted mid-stage has not ended)."""
    limit = space.config.budget.time_limit_s
    if limit is not None and time.monotonic() - started >= limit:
        return False  # the time budget ended the search
    return ended < expected_trials(space)


def _open_search_run(space: SearchSpace, folder: Path, tracking_uri: str, experiment: str | None, resume: bool,
                     store: str | Path | None = None) -> dict[str, Any]:
    state_path = folder / STATE
    if resume:
        state = json.loads(state_path.read_text())
        if state["tracking_uri"] != tracking_uri:
            raise ConfigError(f"--resume: {folder} was tracked in {state['tracking_uri']}, not {tracking_uri}; pass --tracking-uri")
        # Whatever the interrupted search left open is closed now; its trials restart below.
        close_open_runs(tracking_uri, state["experiment_id"], state["search_run_id"], "KILLED", "interrupted; resumed")
        client(tracking_uri).update_run(state["search_run_id"], status="RUNNING")
        return state
    experiment_id = ensure_experiment(tracking_uri, experiment or space.name)
    run_id = create_run(
        tracking_uri, experiment_id, name=f"search-{space.name}", kind=KIND_SEARCH,
        tags={"selftune.space": str(Path(space.source).resolve()), "selftune.pipeline_file": str(space.pipeline_path),
              "selftune.output_dir": str(folder), "selftune.objective": space.config.objective.metric,
              "selftune.mode": space.config.objective.mode},
    )
    tracker = RunTracker(tracking_uri, run_id)
    tracker.log_params({f"space.{k}": v for k, v in flatten(space.config.model_dump(mode="json")).items()})
    (folder / "space.yaml").write_text(yaml.safe_dump(space.config.model_dump(mode="json"), sort_keys=False))
    tracker.log_artifact(folder / "space.yaml")
    state = {"search_run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri,
             "space": str(Path(space.source).resolve()), "store": str(default_store_root(store))}
    state_path.write_text(json.dumps(state, indent=2))
    return state


def _fit(space: SearchSpace, folder: Path, state: dict[str, Any], tracking_uri: str, resume: bool, progress):
    import ray.tune

    from selftune.engine.cluster import ensure_ray

    ensure_ray(worker_output=False, temp_dir=folder)
    # Ray's start replaced ours; SIGTERM must stop Tune as Ctrl-C does, not exit.
    sigterm_as_interrupt(through_sigint_handler=True)
    # A failed trial is one line in the progress and in MLflow; its traceback stays in its error file.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output prints a failed trial's result table whatever `verbose` says
    # Tune snapshots its trials ("auto": every >= 10 s), Optuna writes at once. A trial asked for
    # and ended between two snapshots was lost from Tune by a SIGKILL there (seen in 2 of 3 local
    # runs of the SIGKILL test). A trial's first stage takes longer than a second, so with a
    # 1-second period every trial is in a snapshot before it can end; saving ~10 trials is cheap.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(TUNE_SNAPSHOT_PERIOD_S))
    logging.getLogger("ray.tune.tune").addFilter(_drop_incomplete_trials_line)
    # Actor reuse is off on purpose (see the TuneConfig below); Tune's PBT hint about it is noise here.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    logging.getLogger("ray.tune.schedulers.pbt").addFilter(_drop_no_round_line)
    context = TrialContext(space=space, tracking_uri=tracking_uri, experiment_id=state["experiment_id"],
                           search_run_id=state["search_run_id"], cache_root=_cache_root(space, folder, state),
                           not_logged_dir=str(folder / "not_logged"), own_errors_dir=str(folder / OWN_ERRORS),
                           pbt_dir=str(folder / PBT_RECORDS), store_owner=search_owner(folder))
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_ACTOR_CPUS})
    stage_names = functools.partial(_stage_names, space)
    progress_callback = Progress(space.trial_budget, space.config.objective.mode, progress, stage_names, context.own_errors_dir)
    budget = _disk_budget(space, context, progress)
    callbacks = [TrialRunCloser(tracking_uri, stage_names), progress_callback, *budget]
    tune_path = folder / "tune"
    if resume and not ray.tune.Tuner.can_restore(str(tune_path)):
        _forget_study(folder, space.name)
    if resume and ray.tune.Tuner.can_restore(str(tune_path)):
        progress(f"resuming the Tune experiment in {tune_path}")
        tuner = ray.tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        # Tuner.restore keeps the original RunConfig; the progress and MLflow callbacks are ours again.
        tuner._local_tuner._run_config.callbacks = callbacks  # noqa: SLF001 - no public way to re-attach callbacks
    else:
        tuner = ray.tune.Tuner(
            trainable,
            # PBT's population are points over these keys (Tune resolves points against the space)
            param_space={name: None for name in space.param_names()} if pbt.is_population_search(space) else None,
            tune_config=ray.tune.TuneConfig(
                metric=OBJECTIVE, mode=space.config.objective.mode,
                search_alg=make_searcher(space, folder), scheduler=make_scheduler(space),
                num_samples=space.trial_budget,
                max_concurrent_trials=None if pbt.is_population_search(space) else max_concurrent(space),  # PBT: its generator's
                time_budget_s=space.config.budget.time_limit_s,
                # reuse_actors stays off (Tune's default): with it, a CI run lost a trial whose
                # actor was torn down as another trial ended (ray-project/ray#42951 on its races).
            ),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=str(folder), verbose=0, callbacks=callbacks,
                failure_config=ray.tune.FailureConfig(max_failures=space.config.budget.trial_retries, fail_fast=False),
            ),
        )
    results = tuner.fit()
    for callback in budget:  # the last trials held their stages until their processes ended, after their last report
        callback.enforce_now()
    return results, progress_callback.ended_ids


def _cache_root(space: SearchSpace, folder: Path, state: dict[str, Any]) -> str:
    """The shared stage store; with ``stage_cache: false`` (``--no-cache``) the search folder,
    where each trial keeps its own stages (the store is neither read nor written)."""
    return state["store"] if space.config.stage_cache else str(folder / "stage-cache")


def _disk_budget(space: SearchSpace, context: TrialContext, progress) -> list:
    """The disk budget's callback, when the space sets one and its trials share the store."""
    limit = space.config.budget.disk_bytes
    if limit is None or not space.config.stage_cache:
        return []

    def keys(config: dict[str, Any]) -> set[str]:
        return set(stage_keys(space.pipeline_for(config)))

    return [DiskBudget(context.cache_root, context.store_owner, limit, space.config.objective.mode, keys, progress)]


def _drop_no_round_line(record: logging.LogRecord) -> bool:
    """PBT's warning for a result without ``round``: a trial reports none once its last round ran (on purpose)."""
    return "Cannot find time_attr" not in record.getMessage()


def _drop_incomplete_trials_line(record: logging.LogRecord) -> bool:
    """Tune's "Trials did not complete: [...]": the progress lines and the table already say which failed."""
    return not record.getMessage().startswith("Trials did not complete")


def _stage_names(space: SearchSpace, config: dict[str, Any]) -> list[str]:
    return [stage.name for stage in space.pipeline_for(config).stages]


def _forget_study(folder: Path, study_name: str) -> None:
    """The driver died before Tune saved any state: the search starts over, so the Optuna trials it
    had asked for (left RUNNING) must not count in the new one."""
    import optuna

    storage = f"sqlite:///{folder / 'optuna.db'}"
    if (folder / "optuna.db").exists() and study_name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=study_name, storage=storage)


def make_searcher(space: SearchSpace, folder: Path):
    """Optuna through Tune's ``OptunaSearch``, define-by-run (conditional groups), with the study
    in ``<folder>/optuna.db`` so it survives the driver. PBT takes no searcher (Tune refuses one):
    its initial population, drawn by Optuna, is the list of points Tune starts."""
    import optuna

    if pbt.is_population_search(space):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Every member live at once (no max_concurrent): synchronous PBT waits for all of them at
        # each boundary. What runs at a time is still bounded by the CPUs their stage tasks take.
        return BasicVariantGenerator(points_to_evaluate=pbt.initial_population(space))

    settings = space.config.searcher
    if settings.name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.n_startup_trials, constant_liar=True)
    elif settings.name == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.GridSampler(space.grid(), seed=settings.seed)
    return StageAwareOptunaSearch(
        space=space.suggest, metric=OBJECTIVE, mode=space.config.objective.mode, sampler=sampler,
        points_to_evaluate=settings.points_to_evaluate or None,
        study_name=space.name, storage=optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}"),
    )


def make_scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = space.config.scheduler
    if settings.name == "none":
        return FIFOScheduler()
    if pbt.is_population_search(space):
        return pbt.make_population_scheduler(space)
    pipeline = space.pipeline_for(space.default_sample())
    return ASHAScheduler(
        time_attr=RUNG, max_t=sum(rung_stages(pipeline, space.config.objective.metric)), grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def max_concurrent(space: SearchSpace) -> int:
    """Never more trials than the cluster can run at once: a trial waiting on CPUs or GPUs that
    other trials hold only times out (Train's worker groups are invisible to Tune)."""
    import ray

    resources = space.pipeline_for(space.default_sample()).resources
    cluster = ray.cluster_resources()
    if resources.workers:  # a worker group's CPUs come on top of the trial actor's
        per_trial = resources.workers * resources.cpus_per_worker + TRIAL_ACTOR_CPUS
    else:  # the local-mode stage task takes the trial actor's share out of its own
        per_trial = resources.cpus_per_worker
    fit = int(cluster.get("CPU", 1) // per_trial)
    if fit < 1:
        raise ConfigError(
            f"{space.source}: a trial needs {per_trial:g} CPUs ({resources.workers} workers x resources.cpus_per_worker "
            f"{resources.cpus_per_worker:g}, plus {TRIAL_ACTOR_CPUS} for the trial) but the cluster has {cluster.get('CPU', 0):g}; "
            "lower resources.workers or resources.cpus_per_worker"
        )
    if resources.use_gpu:
        gpus = max(1, resources.workers)
        fit = min(fit, int(cluster.get("GPU", 0) // gpus))
        if fit < 1:
            raise ConfigError(f"{space.source}: a trial needs {gpus} GPU(s) but the cluster has {cluster.get('GPU', 0)}")
    wanted = space.config.budget.max_concurrent
    return max(1, min(fit, wanted) if wanted else fit)


def _log_search_results(space: SearchSpace, folder: Path, tracking_uri: str, run_id: str, rows: list[TrialRow], best: TrialRow | None) -> None:
    tracker = RunTracker(tracking_uri, run_id)
    tracker.log_artifact(write_csv(rows, folder / "results.csv"))
    if rows:
        tracker.log_artifact(plot_search(rows, folder / "search.png"))
    importances = parameter_importances(folder, space.name)
    if importances:
        (folder / "importances.json").write_text(json.dumps(importances, indent=2))
        tracker.log_artifact(folder / "importances.json")
    tracker.log_metrics({"trials": len(rows), "trials_finished": sum(r.status == "FINISHED" for r in rows),
                         "trials_stopped": sum(r.status == "STOPPED" for r in rows),
                         "trials_failed": sum(r.status == "FAILED" for r in rows)})
    if best is not None:
        tracker.set_tags({"selftune.best_trial_id": best.trial_id, "selftune.best_trial_run_id": best.run_id})
        tracker.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracker.log_metrics({"best/objective": best.objective})
        (folder / "best_params.yaml").write_text(yaml.safe_dump(_typed(best.params, space), sort_keys=False))
        tracker.log_artifact(folder / "best_params.yaml")
        if pbt.is_population_search(space):
            _log_best_schedule(space, folder, tracker, best)


def _log_best_schedule(space: SearchSpace, folder: Path, tracker: RunTracker, best: TrialRow) -> None:
    """PBT: the best trial's realised values (per-round lists) as a pipeline fragment that
    ``selftune final --from`` replays; its trial run shows the same as ``schedule/*`` metrics."""
    record = pbt.read_trial_record(str(folder / PBT_RECORDS), best.trial_id)
    if not record:
        return
    header = (f"# The best trial ({best.trial_id}) of search {space.name}: the values it ran with, round by round.\n"
              f"# Replay it with: selftune final --from <this search>, or --params {BEST_SCHEDULE}\n")
    (folder / BEST_SCHEDULE).write_text(header + yaml.safe_dump(record["schedule"], sort_keys=False))
    tracker.log_artifact(folder / BEST_SCHEDULE)
    tracker.set_tags({"selftune.best_schedule": str(folder / BEST_SCHEDULE),
                      "selftune.best_exploits": str(len(record.get("exploits", [])))})
    records = {path.stem: json.loads(path.read_text()) for path in sorted((folder / PBT_RECORDS).glob("*.json"))}
    tracker.log_artifact(pbt.plot_population(records, best.trial_id, space, folder / "population.png"))


def parameter_importances(folder: Path, study_name: str) -> dict[str, float]:
    """Optuna's fANOVA importances over the completed trials ({} with fewer than two)."""
    import optuna

    if not (folder / "optuna.db").is_file():  # a PBT search keeps no study
        return {}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return {name: float(value) for name, value in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. every completed trial sampled the same values
        return {}


def _typed(params: dict[str, str], space: SearchSpace) -> dict[str, Any]:
    """MLflow stores params as strings; read them back as YAML values (numbers stay numbers)."""
    return {name: yaml.safe_load(value) for name, value in params.items() if name in space.param_names()}


def format_outcome(outcome: SearchOutcome, tracking_uri: str) -> str:
    lines = ["", format_rows(outcome.rows)]
    if outcome.best:
        lines.append("\n" + best_line(outcome.best))
        schedule = outcome.folder / BEST_SCHEDULE
        if schedule.is_file():  # PBT: what it ran with, round by round
            lines += [f"  {k} = {v['values'] if isinstance(v, dict) else v}" for k, v in yaml.safe_load(schedule.read_text()).items()]
            lines.append(f"  (round by round, in {schedule})")
        else:
            lines += [f"  {k} = {v}" for k, v in outcome.best.params.items()]
        lines.append(f"run it as a tuned final run with: selftune final --from {outcome.run_id}")
    lines.append(f"\nfolder: {outcome.folder}\nMLflow search run {outcome.run_id}; browse with: mlflow ui --backend-store-uri {tracking_uri}")
    if (outcome.folder / "optuna.db").is_file():
        lines.append(dashboard_line(outcome.folder))
    else:  # PBT keeps no study
        lines.append("Optuna drew this population's first values; Tune's PBT evolved them (no study to browse)")
    if outcome.not_logged:  # last, so that it is what the user sees
        lines.append(describe_not_logged(outcome.not_logged, tracking_uri, outcome.folder / NOT_LOGGED))
        lines += [f"  {item['what']} (not created)" if item["kind"] == "run" else f"  run {item['run']}: {item['what']}"
                  for item in outcome.not_logged if item["kind"] in ("run", "end")]
    return "\n".join(lines)


__all__ = ["SearchOutcome", "run_search", "format_outcome", "find_search_run", "parameter_importances"]
