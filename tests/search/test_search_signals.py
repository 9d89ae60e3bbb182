"""Real signals to a real ``selftune search`` (a subprocess on a tiny search), then ``--resume``,
then counts: every Tune trial once in Tune, in Optuna (``optuna.db``) and in MLflow, no MLflow run
and no Optuna trial left RUNNING.

* One search through Ctrl-C mid-stage, SIGKILL right after an ASHA stop and SIGTERM (``ray job
  stop``, Kubernetes), each followed by ``--resume``: every trial once everywhere, one FINISHED
  stage run per (trial, stage), each stage reported once to its trial run.
* A trial's actor killed (a preempted node): Tune restarts it from its last stage.
* SIGTERM or Ctrl-C to ``selftune run`` on Ray workers: runs KILLED, exit 130.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from support import REPO

pytestmark = pytest.mark.slow

TINY = {
    "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 3,
    "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 3,
    "stages.pseudo_label.threshold": 0.5,
}


def tiny_search(folder: Path, data: Path, name: str, samples: int) -> tuple[Path, dict]:
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": name, "pipeline": str(REPO / "pipelines" / "quickstart.yaml"), "set": {**TINY, "data.root": str(data)},
        "params": {"stages.supervised.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "stages.pseudo_label.threshold": {"type": "float", "low": 0.3, "high": 0.6}},
        "searcher": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"num_samples": samples, "max_concurrent": 2},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    return space, env


def start(space: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selftune", "search", str(space), "--out", str(space.parent / "runs"), *extra],
                            cwd=space.parent, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def signal_when(process: subprocess.Popen, starts: str, signum: int, has: str = "") -> str:
    """Send ``signum`` as soon as a line starting with ``starts`` (and holding ``has``) is printed;
    the whole output."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(starts) and has in line:
            process.send_signal(signum)
            break
    return "".join(lines) + process.communicate(timeout=300)[0]


def finish(space: Path, env: dict) -> str:
    resumed = start(space, env, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    return output


def tune_trial_ids(folder: Path) -> list[str]:
    state = max((folder / "runs").glob("search-*/tune/experiment_state-*.json"))  # each session writes its own; names are times
    return [json.loads(data[0])["trial_id"] for data in json.loads(state.read_text())["trial_data"]]


def study_trials(folder: Path, name: str) -> list:
    (db,) = (folder / "runs").glob("search-*/optuna.db")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


def mlflow_runs(env: dict, kind: str | None = None) -> list:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.`selftune.kind` = '{kind}'" if kind else ""
    return client.search_runs(experiments, filter_string=where, max_results=1000)


def assert_each_trial_once(folder: Path, env: dict, name: str, samples: int) -> None:
    tune = tune_trial_ids(folder)
    assert len(tune) == len(set(tune)) == samples
    study = study_trials(folder, name)
    assert not [t.number for t in study if t.state == optuna.trial.TrialState.RUNNING]
    assert sorted(t.user_attrs.get("tune_trial_id") for t in study) == sorted(tune)  # one Optuna trial each
    trial_runs = [run.data.tags["selftune.trial_id"] for run in mlflow_runs(env, "trial")]
    assert sorted(trial_runs) == sorted(tune)
    assert not [run.info.run_id for run in mlflow_runs(env) if run.info.status == "RUNNING"]
    assert_one_finished_run_per_stage(env)


def assert_one_finished_run_per_stage(env: dict) -> None:
    """Exactly one FINISHED stage run per (trial, stage); any other run of it names the one that
    superseded it."""
    stages = mlflow_runs(env, "stage")
    finished = Counter((run.data.tags["mlflow.parentRunId"], run.data.tags["selftune.stage"])
                       for run in stages if run.info.status == "FINISHED")
    assert finished and set(finished.values()) == {1}, finished
    finished_ids = {run.info.run_id for run in stages if run.info.status == "FINISHED"}
    assert all(run.data.tags.get("selftune.superseded_by") in finished_ids for run in stages if run.info.status != "FINISHED")


def signal_mid_stage(process: subprocess.Popen, env: dict, signum: int) -> str:
    """Send ``signum`` once a stage run has logged an epoch and still trains (a search prints no
    per-epoch lines: its trials' stages run in Ray workers); the whole output."""
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    while process.poll() is None:
        time.sleep(0.2)
        try:
            training = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                          filter_string="tags.`selftune.kind` = 'stage' and attributes.status = 'RUNNING'")
        except Exception:  # noqa: BLE001  (the store is created by the search: not there yet)
            continue
        if any("train/loss" in run.data.metrics for run in training):
            process.send_signal(signum)
            break
    return process.communicate(timeout=300)[0]


def assert_interrupted(process: subprocess.Popen, output: str, env: dict, samples: int) -> None:
    """Exit 130 without a traceback; the search run and every trial run that had not ended KILLED."""
    assert process.returncode == 130, output[-3000:]
    assert "continue with --resume" in output and "Traceback" not in output
    (search_run,) = mlflow_runs(env, "search")
    assert search_run.info.status == "KILLED"
    assert not [run.info.run_id for run in mlflow_runs(env) if run.info.status == "RUNNING"]
    ended = int(re.search(rf"interrupted after (\d+) of {samples} trials", search_run.data.tags["selftune.error"]).group(1))
    # Tune stops a torn-down trial at its next report as it stops a finished one: its run must not say FINISHED.
    assert sum(run.info.status == "FINISHED" for run in mlflow_runs(env, "trial")) == ended


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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's raylet is the driver's child, its workers the raylet's)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    below, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        below += children
        frontier = children
    return below


def named(pids: list[int], title: str) -> list[int]:
    found = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_trial_whose_actor_is_killed_is_restarted_from_its_last_stage(tmp_path, small_synthetic):
    """What Ray does to a preempted node or an OOM-killed worker: the trial's own process dies."""
    space, env = tiny_search(tmp_path, small_synthetic, "lost", samples=2)
    settings = yaml.safe_load(space.read_text())
    settings["set"]["stages.self_train.steps_per_epoch"] = 40  # long enough to be killed in
    settings["scheduler"] = {"name": "none"}
    space.write_text(yaml.safe_dump(settings))
    search = start(space, env)
    lines = []
    for line in search.stdout:
        lines.append(line)
        if line.startswith("  trial ") and "stage 2/3" in line:  # labelled: its self-training stage starts
            (victim, *_) = named(descendants(search.pid), "ray::ImplicitFunc")
            os.kill(victim, signal.SIGKILL)
            break
    output = "".join(lines) + search.communicate(timeout=300)[0]
    assert search.returncode == 0, output[-3000:]
    assert "restarting after" in output and "Ray lost it; restart 1 of 2" in output
    assert_each_trial_once(tmp_path, env, "lost", samples=2)
    finished = [(run.data.tags["selftune.trial_id"], run.data.tags["selftune.stage"])
                for run in mlflow_runs(env, "stage") if run.info.status == "FINISHED"]
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 2 * 3  # each stage of each trial once
    assert len(study_trials(tmp_path, "lost")) == 2
    assert {t.state for t in study_trials(tmp_path, "lost")} == {optuna.trial.TrialState.COMPLETE}


def test_ctrl_c_mid_stage_then_resume_leaves_one_finished_run_per_stage(tmp_path, small_synthetic):
    # Stopped mid-stage, a trial either finishes the stage before Ray goes down (its next report
    # ends it; Tune never saw the report) or is killed in it: both resume to one FINISHED run.
    space, env = tiny_search(tmp_path, small_synthetic, "mid", samples=2)
    spec = yaml.safe_load(space.read_text())
    spec["set"].update({"stages.supervised.epochs": 2, "stages.supervised.steps_per_epoch": 10})
    space.write_text(yaml.safe_dump(spec))
    first = start(space, env)
    output = signal_mid_stage(first, env, signal.SIGINT)
    assert first.returncode == 130, output[-3000:]
    assert not [run.info.run_id for run in mlflow_runs(env) if run.info.status == "RUNNING"]
    finish(space, env)
    assert_each_trial_once(tmp_path, env, "mid", samples=2)
    supervised = [run for run in mlflow_runs(env, "stage") if run.data.tags["selftune.stage"] == "supervised"]
    assert len({run.data.tags["mlflow.parentRunId"] for run in supervised if run.info.status == "FINISHED"}) == 2


@pytest.mark.parametrize(("signum", "when"), [(signal.SIGTERM, "Started training worker group"), (signal.SIGINT, "epoch 1/")])
def test_a_signal_ends_a_run_on_ray_workers_killed(tmp_path, small_synthetic, signum, when):
    """``selftune run`` with a worker group starts Ray, whose start replaces the SIGTERM handler and
    whose ``fit()`` would install a SIGINT handler that exits 1: either signal ends it as Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sets = [f"{key}={value}" for key, value in {**TINY, "data.root": str(small_synthetic), "resources.workers": 1,
                                                 "stages.supervised.epochs": 3, "stages.supervised.steps_per_epoch": 100}.items()]
    run = subprocess.Popen([sys.executable, "-m", "selftune", "run", str(REPO / "pipelines" / "quickstart.yaml"),
                            "--out", str(tmp_path / "out"), *[arg for item in sets for arg in ("--set", item)]],
                           cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = signal_when(run, "", signum, has=when)  # Ray is up and the stage trains (SIGINT: an epoch is done)
    assert run.returncode == 130, output[-3000:]
    runs = mlflow_runs(env)
    assert runs and {run.info.status for run in runs} == {"KILLED"}
