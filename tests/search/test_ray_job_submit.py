"""`ray job submit` of a search to a real local cluster (`ray start --head`) with token auth, as the
README tells users to do; the job joins the existing cluster and logs to the MLflow store it is
given; `ray job stop` ends it KILLED and a second job with `--resume` finishes it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from support import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path, session_home):
    ray = str(Path(sys.executable).with_name("ray"))
    dashboard = free_port()
    env = {**os.environ, "HOME": str(session_home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--num-gpus=0",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                    # Its own agent ports: the default 52365 may be held by a Ray instance of a test
                    # running alongside, and a head whose job agent cannot bind refuses every job.
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "ray": ray}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit_job(cluster, args: list[str]) -> subprocess.CompletedProcess:
    """``ray job submit``, tried again while the head's job agent is still starting: on a loaded
    machine the dashboard answers before its agent has registered, and Ray says to try again later
    (nothing was submitted)."""
    for _ in range(6):
        submit = subprocess.run([cluster["ray"], "job", "submit", "--address", cluster["address"], *args],
                                env=cluster["env"], capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            return submit
        time.sleep(5)
    return submit


def job(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cluster["ray"], "job", *args, "--address", cluster["address"]], env=cluster["env"],
                          capture_output=True, text=True, timeout=600)


def stop_when_a_trial_reports(cluster, submission_id: str, timeout_s: float = 300) -> str:
    """``ray job stop`` as soon as the job's log shows a trial's first stage report; the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = job(cluster, "logs", submission_id).stdout
        if "  trial " in logs:
            stopped = job(cluster, "stop", submission_id)  # waits until the job has ended
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            return job(cluster, "logs", submission_id).stdout
        time.sleep(1)
    raise AssertionError(f"no trial reported within {timeout_s} s:\n{logs[-3000:]}")


def test_a_search_submitted_as_a_ray_job_survives_ray_job_stop_and_resumes(tmp_path, cluster, session_home, small_synthetic):
    """``ray job stop`` sends SIGTERM, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (Ray's
    default 3 s is too short for Tune to save its state and selftune to end its runs, hence the
    README's 60): the search ends KILLED, and a second job with ``--resume`` finishes it."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "space.yaml").write_text(yaml.safe_dump({
        "name": "job", "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {"data.root": str(small_synthetic), "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 3,
                "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 30,  # still training when stopped
                "stages.pseudo_label.threshold": 0.5},
        "params": {"stages.self_train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
        "scheduler": {"name": "none"},
        "budget": {"num_samples": 2, "max_concurrent": 2},
    }))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "SELFTUNE_CACHE": str(session_home / "cache"),
                                           "OMP_NUM_THREADS": "1", "RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    search = ["--", "python", "-m", "selftune", "search", "space.yaml", "--out", str(tmp_path / "runs")]
    submit = submit_job(cluster, ["--working-dir", str(job_dir), "--runtime-env-json", runtime_env,
                                  "--submission-id", "first", "--no-wait", *search])
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    logs = stop_when_a_trial_reports(cluster, "first")
    assert "was stopped" in job(cluster, "status", "first").stdout
    assert "continue with --resume" in logs and "Traceback" not in logs, logs[-3000:]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("job").experiment_id
    (search_run,) = client.search_runs([experiment], filter_string="tags.`selftune.kind` = 'search'")
    assert search_run.info.status == "KILLED"
    assert not [run.info.run_id for run in client.search_runs([experiment]) if run.info.status == "RUNNING"]

    resumed = submit_job(cluster, ["--working-dir", str(job_dir), "--runtime-env-json", runtime_env, *search, "--resume"])
    assert resumed.returncode == 0 and "succeeded" in resumed.stdout.lower(), resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = client.search_runs([experiment])
    kinds = Counter(run.data.tags["selftune.kind"] for run in runs if run.info.status == "FINISHED")
    assert kinds == {"search": 1, "trial": 2, "stage": 6}  # one FINISHED stage run per (trial, stage)
    assert not [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    # ...and the cluster refuses a client without its token.
    env = {**cluster["env"], "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN")
    listing = subprocess.run([cluster["ray"], "job", "list", "--address", cluster["address"]],
                             env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode != 0
