"""A trial that ASHA stops at a stage boundary must reach Optuna as PRUNED, not as a COMPLETE
trial whose partial value TPE would model as final."""

from __future__ import annotations

import optuna
import yaml

import selftune.stages  # noqa: F401
from selftune.search.searcher import StageAwareOptunaSearch
from selftune.search.space import load_search_space
from support import REPO


def make_searcher(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "params": {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}},
    }))
    space = load_search_space(path)
    searcher = StageAwareOptunaSearch(space=space.suggest, metric="objective", mode="max",
                                      sampler=optuna.samplers.RandomSampler(seed=0))
    return searcher


def report(searcher, trial_id, values, total=3):
    for stage, value in enumerate(values, start=1):
        searcher.on_trial_result(trial_id, {"objective": value, "stage": stage, "stages_total": total, "training_iteration": stage})
    return {"objective": values[-1], "stage": len(values), "stages_total": total, "training_iteration": len(values)}


def test_stopped_early_is_pruned_and_finished_is_complete(tmp_path):
    searcher = make_searcher(tmp_path)
    for trial_id in ("stopped", "finished", "crashed"):
        assert "stages.pseudo_label.threshold" in searcher.suggest(trial_id)
    searcher.on_trial_complete("stopped", report(searcher, "stopped", [0.40]))
    searcher.on_trial_complete("finished", report(searcher, "finished", [0.41, 0.41, 0.52]))
    searcher.on_trial_complete("crashed", None, error=True)
    trials = {t.number: t for t in searcher._ot_study.trials}
    stopped, finished, crashed = trials[0], trials[1], trials[2]
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.40}  # (Optuna keeps the last one as a pruned trial's value)
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.value == 0.52
    assert finished.intermediate_values == {1: 0.41, 2: 0.41, 3: 0.52}
    assert crashed.state == optuna.trial.TrialState.FAIL


def test_plain_optuna_search_would_have_told_complete(tmp_path):
    """The behaviour the subclass corrects, so this test fails if Ray ever fixes it upstream."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = make_searcher(tmp_path)
    plain = OptunaSearch(space=searcher._space, metric="objective", mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
    plain.suggest("stopped")
    plain.on_trial_complete("stopped", report(plain, "stopped", [0.40]))
    assert plain._ot_study.trials[0].state == optuna.trial.TrialState.COMPLETE
