"""Real signals to a real ``selftune search`` or ``selftune run`` (a subprocess), then counts.

* A trial's actor killed (a preempted node): Tune restarts it from its last stage.
* SIGTERM or Ctrl-C to ``selftune run`` on Ray workers: runs KILLED, exit 130.

The search through Ctrl-C, SIGKILL and SIGTERM with resumes is in ``test_search_interrupt_chain.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from search_signals import TINY, assert_each_trial_once, mlflow_runs, signal_when, start, study_trials, tiny_search
from support import REPO

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize(("signum", "when"), [(signal.SIGTERM, "Started training worker group"), (signal.SIGINT, "epoch 1/")])
def test_a_signal_ends_a_run_on_ray_workers_killed(tmp_path, small_synthetic, signum, when):
    """``selftune run`` with a worker group starts Ray, whose start replaces the SIGTERM handler and
    whose ``fit()`` would install a SIGINT handler that exits 1: either signal ends it as Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sets = [f"{key}={value}" for key, value in {**TINY, "data.root": str(small_synthetic), "resources.workers": 1,
                                                 "stages.supervised.epochs": 3, "stages.supervised.steps_per_epoch": 20}.items()]
    run = subprocess.Popen([sys.executable, "-m", "selftune", "run", str(REPO / "pipelines" / "quickstart.yaml"),
                            "--out", str(tmp_path / "out"), *[arg for item in sets for arg in ("--set", item)]],
                           cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = signal_when(run, "", signum, has=when)  # Ray is up and the stage trains (SIGINT: an epoch is done)
    assert run.returncode == 130, output[-3000:]
    runs = mlflow_runs(env)
    assert runs and {run.info.status for run in runs} == {"KILLED"}
