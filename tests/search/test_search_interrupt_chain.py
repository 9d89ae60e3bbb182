"""One search through every interrupt a user or a cluster sends, each followed by ``--resume``,
then counts (issue 12's end-to-end test). Its own file so that the test runner can give it a
worker of its own (it is the suite's longest test)."""

from __future__ import annotations

import signal

import pytest
import yaml
from mlflow import MlflowClient

from search_signals import (
    assert_each_trial_once, assert_interrupted, finish, mlflow_runs, signal_mid_stage, signal_when, start, tiny_search,
)

pytestmark = pytest.mark.slow


def test_ctrl_c_mid_stage_sigkill_after_an_asha_stop_and_sigterm_each_resume_to_one_consistent_search(tmp_path, small_synthetic):
    """One search through every interrupt a user or a cluster sends, each followed by ``--resume``:
    Ctrl-C while a stage trains; SIGKILL right after ASHA stopped a trial (Optuna has recorded the
    stop, Tune's snapshot may not have); SIGTERM (``ray job stop``, Kubernetes), taken as Ctrl-C."""
    samples = 6
    space, env = tiny_search(tmp_path, small_synthetic, "chain", samples=samples)
    spec = yaml.safe_load(space.read_text())
    spec["set"].update({"stages.supervised.epochs": 2, "stages.supervised.steps_per_epoch": 10})  # long enough to stop in
    space.write_text(yaml.safe_dump(spec))

    first = start(space, env)
    assert_interrupted(first, signal_mid_stage(first, env, signal.SIGINT), env, samples)

    second = start(space, env, "--resume")
    output = signal_when(second, "▶ trial", signal.SIGKILL, has="stopped after stage")
    assert second.returncode == -signal.SIGKILL, output[-3000:]  # (no ASHA stop at all would end it with 0)

    third = start(space, env, "--resume")
    assert_interrupted(third, signal_when(third, "  trial ", signal.SIGTERM), env, samples)  # a trial is running

    assert "resuming the Tune experiment" in finish(space, env)
    finish(space, env)  # a resume of a finished search changes nothing
    assert mlflow_runs(env, "search")[0].info.status == "FINISHED"
    assert_each_trial_once(tmp_path, env, "chain", samples=samples)
    assert {run.info.status for run in mlflow_runs(env, "trial")} == {"FINISHED"}
    supervised = [run for run in mlflow_runs(env, "stage") if run.data.tags["selftune.stage"] == "supervised"]
    assert len({run.data.tags["mlflow.parentRunId"] for run in supervised if run.info.status == "FINISHED"}) == samples
    for trial in mlflow_runs(env, "trial"):  # each stage reported once to the trial run, whatever was redone
        steps = [m.step for m in MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(trial.info.run_id, "cache_hits")]
        assert len(steps) == len(set(steps)), (trial.data.tags["selftune.trial_id"], steps)
