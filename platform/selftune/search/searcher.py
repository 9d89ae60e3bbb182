"""Tune's ``OptunaSearch``, told the truth about trials the scheduler stopped early."""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from selftune.search.trial import OBJECTIVE, STAGE


class StageAwareOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED, not COMPLETE, for a trial that ASHA stopped at a stage boundary: its
    last value is a partial one, and TPE must not model it as final. (Tune's ``OptunaSearch`` runs
    with a ``NopPruner`` and tells COMPLETE with the last reported value.) The per-stage values
    stay in the study as intermediate values, which TPE uses to rank pruned trials."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if OBJECTIVE in result:  # a stage that reported no objective adds no intermediate value
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error and trial_id not in self._completed_trials and stopped_early(result):
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def stopped_early(result: dict | None) -> bool:
    return bool(result) and result.get(STAGE, 0) < result.get("stages_total", 0)
