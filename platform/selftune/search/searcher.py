"""Tune's ``OptunaSearch``, told the truth about trials the scheduler stopped early, and kept
consistent with Optuna's database when a search resumes after a crash."""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from selftune.search.trial import OBJECTIVE, STAGE

TUNE_TRIAL_ID = "tune_trial_id"  # user attribute of each Optuna trial: the Tune trial it belongs to


class StageAwareOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED, not COMPLETE, for a trial that ASHA stopped at a stage boundary: its
    last value is a partial one, and TPE must not model it as final. (Tune's ``OptunaSearch`` runs
    with a ``NopPruner`` and tells COMPLETE with the last reported value.) The per-stage values
    stay in the study as intermediate values, which TPE uses to rank pruned trials.

    Resuming: Optuna writes to its database at once, Tune snapshots its state (this searcher
    included) every ten seconds or so. A driver killed in between resumes from a snapshot that is
    behind the study: trials the study has finished may run again, and trials asked after the
    snapshot stay RUNNING in the study with no Tune trial. So the study is the truth: a trial it
    has finished is never reported or told again, and a RUNNING trial no Tune trial knows is handed
    to the next new Tune trial (same sampled values, and points_to_evaluate are not lost)."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {trial._trial_id for trial in self._ot_trials.values()}  # noqa: SLF001 - Optuna's own id
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._unclaimed = [trial._trial_id for trial in running if trial._trial_id not in known]  # noqa: SLF001

    def suggest(self, trial_id: str) -> dict | None:
        unclaimed = getattr(self, "_unclaimed", None)
        if trial_id not in self._ot_trials and unclaimed:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, unclaimed.pop(0))
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A stage that reported no objective adds no intermediate value.
        if OBJECTIVE in result and not self._already_told(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._already_told(trial_id):
            self._completed_trials.add(trial_id)
            return
        if not error and stopped_early(result):
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def _already_told(self, trial_id: str) -> bool:
        """True once the study has this trial's end, whether or not Tune's snapshot knows it."""
        if trial_id in self._completed_trials:
            return True
        trial = self._ot_trials.get(trial_id)
        if trial is None:
            return False
        return self._ot_study._storage.get_trial(trial._trial_id).state.is_finished()  # noqa: SLF001


def stopped_early(result: dict | None) -> bool:
    return bool(result) and result.get(STAGE, 0) < result.get("stages_total", 0)
