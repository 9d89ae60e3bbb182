"""Tune callbacks that run in the search driver: MLflow run hygiene and progress lines."""

from __future__ import annotations

import math
from typing import Callable

from ray.tune import Callback

from selftune.search.searcher import stopped_early
from selftune.search.trial import OBJECTIVE, STAGE
from selftune.tracking import attempt, client


class TrialRunCloser(Callback):
    """Tune callback (driver side): trial runs end in a terminal MLflow state whatever happened in
    the trial's process: stopped early by the scheduler (FINISHED + ``selftune.stopped_early``),
    crashed (FAILED with the reason) — and no stage run under them stays RUNNING."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

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

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        attempt(lambda: self._error(trial), self.tracking_uri, "end", f"end trial {trial.trial_id}'s runs as FAILED",
                run=(trial.last_result or {}).get("trial_run_id"))

    def _error(self, trial) -> None:
        run_id = (trial.last_result or {}).get("trial_run_id") or _run_of_trial(self.tracking_uri, trial.trial_id)
        if not run_id:
            return
        mlflow = client(self.tracking_uri)
        reason = f"trial {trial.trial_id} failed; Tune's error file: {getattr(trial, 'error_file', None)}"
        _close_children(mlflow, run_id, "FAILED", reason)
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_tag(run_id, "selftune.error", reason)
            mlflow.set_terminated(run_id, "FAILED")


class Progress(Callback):
    """Tune callback: one line per finished stage and trial, with the best objective so far."""

    def __init__(self, total: int, mode: str, say: Callable[[str], None]):
        self.total, self.mode, self.say = total, mode, say
        self.best: float | None = None
        self.done = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(OBJECTIVE)
        hit = " (stage cache hit)" if result.get("cache_hit") else ""
        shown = "-" if value is None else f"{value:.4f}"
        self.say(f"  trial {trial.trial_id}: stage {result.get(STAGE)}/{result.get('stages_total')} objective {shown}{hit}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, "FAILED")

    def _finished(self, trials, trial, how: str) -> None:
        self.done += 1
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


def _close_children(mlflow, parent_run_id: str, status: str, reason: str) -> None:
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    for run in mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        mlflow.set_tag(run.info.run_id, "selftune.error", reason)
        mlflow.set_terminated(run.info.run_id, status)


def close_open_runs(tracking_uri: str, experiment_id: str, search_run_id: str, status: str, reason: str) -> None:
    """End every RUNNING trial and stage run under the search (after a crash or an interrupt);
    what cannot be ended (the server is unreachable) is recorded as not logged."""
    attempt(lambda: _close_open_runs(tracking_uri, experiment_id, search_run_id, status, reason),
            tracking_uri, "end", f"end the search's open runs as {status}", run=search_run_id)


def _close_open_runs(tracking_uri: str, experiment_id: str, search_run_id: str, status: str, reason: str) -> None:
    mlflow = client(tracking_uri)
    trials = mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{search_run_id}'", max_results=10_000)
    for trial in trials:
        _close_children(mlflow, trial.info.run_id, status, reason)
        if trial.info.status == "RUNNING":
            mlflow.set_tag(trial.info.run_id, "selftune.error", reason)
            mlflow.set_terminated(trial.info.run_id, status)
