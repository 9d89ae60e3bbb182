"""Tune callbacks that run in the search driver: MLflow run hygiene and progress lines."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from ray.tune import Callback

from selftune.errors import failure_reason
from selftune.search.searcher import stopped_early
from selftune.search.trial import OBJECTIVE, STAGE, own_error_file
from selftune.tracking import attempt, client

StageNames = Callable[[dict[str, Any]], list[str]]  # a trial's config -> its pipeline's stage names
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def trial_failure(trial, stage_names: StageNames | None = None) -> str:
    """``stage <name>: <reason>`` for a trial Tune saw fail (its traceback stays in its error file)."""
    try:
        error = _pickled_error(trial)
    except Exception:  # noqa: BLE001 - an error that does not unpickle: its text names it
        error = None
    reason = failure_reason(error) if error is not None else _last_line(_error_text(trial))
    done = (trial.last_result or {}).get(STAGE, 0)  # stages done: the failing one is the next
    names = _stage_names(trial, stage_names)
    return f"stage {names[done]}: {reason}" if done < len(names) else reason


def _pickled_error(trial) -> BaseException | None:
    """The error Tune pickled for the trial, read by Tune itself (selftune unpickles nothing); when
    Tune's storage copy is not there yet, the error file's text names the cause instead."""
    return trial.get_pickled_error()


def _last_line(text: str) -> str:
    """The traceback's last line, without colours or a selftune exception's dotted class name
    (``selftune.engine.loop.TrainingDiverged: training diverged: …`` -> ``training diverged: …``)."""
    lines = [line.strip() for line in _COLOUR.sub("", text).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    name, sep, message = lines[-1].partition(": ")
    return message if sep and name.startswith("selftune.") and " " not in name else lines[-1]


def _error_text(trial) -> str:
    path = trial.error_file
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return str(trial.get_error() or "")


def error_file(trial) -> str | None:
    """The trial's error file (the full traceback) in the search folder, where it outlives Ray's session."""
    name = trial.run_metadata.error_filename
    return os.path.join(trial.path, name) if name and trial.path else trial.error_file


def _stage_names(trial, stage_names: StageNames | None) -> list[str]:
    if stage_names is None:
        return []
    try:
        return stage_names(trial.config)
    except Exception:  # noqa: BLE001 - naming the stage is a courtesy, never a second failure
        return []


class TrialRunCloser(Callback):
    """Tune callback (driver side): trial runs end in a terminal MLflow state whatever happened in
    the trial's process: stopped early by the scheduler (FINISHED + ``selftune.stopped_early``),
    crashed (FAILED with the reason) — and no stage run under them stays RUNNING."""

    def __init__(self, tracking_uri: str, stage_names: StageNames | None = None):
        self.tracking_uri = tracking_uri
        self.stage_names = stage_names

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        run_id = result.get("trial_run_id")
        if not run_id:
            return
        # A server gone away must not fail the search: attempt() records what was not done.
        attempt(lambda: self._complete(run_id, result), self.tracking_uri, "end", "end the trial's runs", run=run_id)

    def _complete(self, run_id: str, result: dict) -> None:
        mlflow = client(self.tracking_uri)
        if stopped_early(result):
            mlflow.set_tag(run_id, "selftune.stopped_early", f"after stage {result[STAGE]} of {result['stages_total']}")
        _close_children(mlflow, run_id, "KILLED", "the trial was stopped")
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_terminated(run_id, "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """Tune restarts the trial: the stage its lost process was running stays RUNNING otherwise."""
        run_id = (trial.last_result or {}).get("trial_run_id") or _run_of_trial(self.tracking_uri, trial.trial_id)
        if run_id:
            reason = f"{trial_failure(trial, self.stage_names)}; the trial was restarted"
            attempt(lambda: _close_children(client(self.tracking_uri), run_id, "KILLED", reason), self.tracking_uri,
                    "end", f"end trial {trial.trial_id}'s lost stage run", run=run_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        attempt(lambda: self._error(trial), self.tracking_uri, "end", f"end trial {trial.trial_id}'s runs as FAILED",
                run=(trial.last_result or {}).get("trial_run_id"))

    def _error(self, trial) -> None:
        run_id = (trial.last_result or {}).get("trial_run_id") or _run_of_trial(self.tracking_uri, trial.trial_id)
        if not run_id:
            return
        mlflow = client(self.tracking_uri)
        reason = trial_failure(trial, self.stage_names)
        _close_children(mlflow, run_id, "FAILED", reason)
        _shorten_stage_errors(mlflow, run_id, reason.split(": ", 1)[-1] if reason.startswith("stage ") else reason)
        # The trial's own process tagged its run with Ray's whole traceback: one line instead.
        mlflow.set_tag(run_id, "selftune.error", reason)
        mlflow.set_tag(run_id, "selftune.error_file", str(error_file(trial)))
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_terminated(run_id, "FAILED")


class Progress(Callback):
    """Tune callback: one line per finished stage and trial, with the best objective so far."""

    def __init__(self, total: int, mode: str, say: Callable[[str], None], stage_names: StageNames | None = None,
                 own_errors_dir: str = ""):
        self.total, self.mode, self.say, self.stage_names = total, mode, say, stage_names
        self.own_errors_dir = own_errors_dir
        self.best: float | None = None
        self.done = 0
        self._ended_ids: set[str] | None = None  # trials that ended (finished, stopped or failed), all sessions

    @property
    def ended_ids(self) -> set[str] | None:
        """The trials that ended, earlier sessions included (None: stopped before Tune's first
        step, so not known). Not Tune's states at the end: on an interrupt Tune marks every trial it tears down
        TERMINATED (after saving them as running), and not their last report, by which an
        interrupted trial looks stopped."""
        return None if self._ended_ids is None else set(self._ended_ids)

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self._ended_ids is None:  # the first step: trials a resumed search restored as ended
            self._ended_ids = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_experiment_end(self, trials, **info) -> None:
        if self._ended_ids is None:  # no step ran (a resumed search that had already ended): nothing was torn down
            self.on_step_begin(0, trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(OBJECTIVE)
        if "exploited_from" in result:  # PBT restored this trial from a stronger one's stages
            self.say(f"  trial {trial.trial_id}: exploit after round {result.get('exploit_round')}: "
                     f"continues from trial {result['exploited_from']}'s stages ({result.get('exploit_changes')})")
        hit = " (stage cache hit)" if result.get("cache_hit") else ""
        shown = "-" if value is None else f"{value:.4f}"
        self.say(f"  trial {trial.trial_id}: stage {result.get(STAGE)}/{result.get('stages_total')} objective {shown}{hit}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, f"FAILED ({trial_failure(trial, self.stage_names)})")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        if self.own_errors_dir and own_error_file(self.own_errors_dir, trial.trial_id).is_file():
            return  # its own error: the restart fails at once, and its FAILED line follows
        failures = trial.run_metadata.num_failures
        self.say(f"  trial {trial.trial_id}: restarting after {trial_failure(trial, self.stage_names)} "
                 f"(Ray lost it; restart {failures} of {trial.max_failures})")

    def _finished(self, trials, trial, how: str) -> None:
        self.done += 1
        self._ended_ids = (self._ended_ids or set()) | {trial.trial_id}
        result = trial.last_result or {}
        if how == "done" and result.get(STAGE) == result.get("stages_total") and OBJECTIVE in result:
            value = result[OBJECTIVE]
            if math.isfinite(value) and (self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
                self.best = value
        if how == "done" and stopped_early(result):
            how = f"stopped after stage {result[STAGE]}"
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)  # Tune flips its status after us
        best = "-" if self.best is None else f"{self.best:.4f}"
        self.say(f"▶ trial {trial.trial_id} {how}: {self.done}/{self.total} done, {running} running, best so far {best}")


def _run_of_trial(tracking_uri: str, trial_id: str) -> str | None:
    runs = client(tracking_uri).search_runs(
        [e.experiment_id for e in client(tracking_uri).search_experiments()],
        filter_string=f"tags.`selftune.trial_id` = '{trial_id}' and tags.`selftune.kind` = 'trial'", max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _shorten_stage_errors(mlflow, trial_run_id: str, reason: str) -> None:
    """A stage run that failed by itself was tagged with its process's whole (Ray) traceback."""
    experiment_id = mlflow.get_run(trial_run_id).info.experiment_id
    for run in mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{trial_run_id}' and attributes.status = 'FAILED'"):
        if "\n" in run.data.tags.get("selftune.error", ""):
            mlflow.set_tag(run.info.run_id, "selftune.error", reason)


def _close_children(mlflow, parent_run_id: str, status: str, reason: str) -> None:
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    for run in mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        mlflow.set_tag(run.info.run_id, "selftune.error", reason)
        mlflow.set_terminated(run.info.run_id, status)


def close_open_runs(tracking_uri: str, experiment_id: str, search_run_id: str, status: str, reason: str,
                    *, ended_trials: set[str] | None = None) -> None:
    """End every RUNNING trial and stage run under the search (after a crash or an interrupt);
    what cannot be ended (the server is unreachable) is recorded as not logged. With
    ``ended_trials`` (an interrupt, where Tune knows which trials ended), a trial run outside it
    ends ``status`` even if its own process ended it FINISHED: Tune's teardown stops a trial at
    its next report the way it stops a finished one (``SystemExit(0)``)."""
    attempt(lambda: _close_open_runs(tracking_uri, experiment_id, search_run_id, status, reason, ended_trials),
            tracking_uri, "end", f"end the search's open runs as {status}", run=search_run_id)


def _close_open_runs(tracking_uri: str, experiment_id: str, search_run_id: str, status: str, reason: str,
                     ended_trials: set[str] | None) -> None:
    mlflow = client(tracking_uri)
    trials = mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{search_run_id}'", max_results=10_000)
    for trial in trials:
        _close_children(mlflow, trial.info.run_id, status, reason)
        torn_down = (ended_trials is not None and trial.info.status == "FINISHED"
                     and trial.data.tags.get("selftune.kind") == "trial" and trial.data.tags.get("selftune.trial_id") not in ended_trials)
        if trial.info.status == "RUNNING" or torn_down:
            mlflow.set_tag(trial.info.run_id, "selftune.error", reason)
            mlflow.set_terminated(trial.info.run_id, status)
