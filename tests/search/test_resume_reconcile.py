"""A driver killed between Optuna's write and Tune's next snapshot resumes from a snapshot that is
behind the study. The searcher must then treat the study as the truth: no report or tell for a
trial the study already finished (Optuna raises UpdateFinishedTrialError), and a trial the study
holds RUNNING that no restored Tune trial knows goes to the next new Tune trial, not a second ask."""

from __future__ import annotations

import optuna
import yaml

import selftune.stages  # noqa: F401
from selftune.search.searcher import TUNE_TRIAL_ID, StageAwareOptunaSearch
from selftune.search.space import load_search_space
from support import REPO

RUNNING, PRUNED, COMPLETE = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.PRUNED,
                             optuna.trial.TrialState.COMPLETE)


def searcher_on(tmp_path, points: bool = True) -> StageAwareOptunaSearch:
    """``points=False``: as Tune's restore brings it back (unpickled, so nothing is enqueued twice)."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "params": {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}},
    }))
    space = load_search_space(path)
    return StageAwareOptunaSearch(
        space=space.suggest, metric="objective", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
        points_to_evaluate=[{"stages.pseudo_label.threshold": 0.55}, {"stages.pseudo_label.threshold": 0.65},
                            {"stages.pseudo_label.threshold": 0.75}] if points else None,
        study_name="s", storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"),
    )


def result(stage: int, value: float) -> dict:
    return {"objective": value, "stage": stage, "stages_total": 3, "training_iteration": stage}


def test_a_resume_from_a_stale_snapshot_neither_crashes_nor_adds_trials(tmp_path):
    before = searcher_on(tmp_path)
    before.suggest("a")
    before.suggest("b")
    before.on_trial_result("a", result(1, 0.40))
    before.save(str(tmp_path / "snapshot.pkl"))  # Tune's last snapshot: a and b running
    before.on_trial_complete("a", result(1, 0.40))  # ASHA stopped a: PRUNED in the study ...
    orphan = before.suggest("c")  # ... and c was asked; then the driver was killed

    after = searcher_on(tmp_path, points=False)
    after.restore(str(tmp_path / "snapshot.pkl"))
    # Tune runs a again from the snapshot: its stage result and end reach the study no more.
    after.on_trial_result("a", result(1, 0.41))
    after.on_trial_complete("a", result(1, 0.41))
    # A new Tune trial takes over the study's RUNNING trial c: same values, no new Optuna trial.
    assert after.suggest("d") == orphan
    after.on_trial_complete("d", result(3, 0.70))
    after.on_trial_complete("b", result(3, 0.60))

    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.state for t in trials] == [PRUNED, COMPLETE, COMPLETE]
    assert trials[0].intermediate_values == {1: 0.40}  # the first report stands
    assert [t.user_attrs[TUNE_TRIAL_ID] for t in trials] == ["a", "b", "d"]
    assert [t.params["stages.pseudo_label.threshold"] for t in trials] == [0.55, 0.65, 0.75]  # points_to_evaluate kept


def test_without_a_stale_snapshot_nothing_changes(tmp_path):
    searcher = searcher_on(tmp_path, points=False)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "snapshot.pkl"))
    resumed = searcher_on(tmp_path, points=False)
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    resumed.on_trial_result("a", result(1, 0.5))
    resumed.on_trial_complete("a", result(3, 0.6))
    resumed.suggest("b")
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [(t.state, t.user_attrs[TUNE_TRIAL_ID]) for t in trials] == [(COMPLETE, "a"), (RUNNING, "b")]
    assert trials[0].intermediate_values == {1: 0.5}
