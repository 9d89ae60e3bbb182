"""What the signal tests share: a tiny quickstart search in a subprocess, signals sent when the
output or MLflow says so, and the counts every interrupt test makes (each trial once in Tune,
Optuna and MLflow; one FINISHED stage run per (trial, stage); nothing RUNNING)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import yaml
from mlflow import MlflowClient

from support import REPO

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
