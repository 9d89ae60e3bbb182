"""`ray job submit` of a search to a real local cluster (`ray start --head`) with token auth, as the
README tells users to do; the job joins the existing cluster and logs to the MLflow store it is given."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
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


def test_a_search_submitted_as_a_ray_job_succeeds_logs_its_runs_and_needs_the_token(tmp_path, cluster, session_home, small_synthetic):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "space.yaml").write_text(yaml.safe_dump({
        "name": "job", "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {"data.root": str(small_synthetic), "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 3,
                "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 3,
                "stages.pseudo_label.threshold": 0.5},
        "params": {"stages.self_train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
        "scheduler": {"name": "none"},
        "budget": {"num_samples": 2, "max_concurrent": 2},
    }))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "SELFTUNE_CACHE": str(session_home / "cache"),
                                "OMP_NUM_THREADS": "1"}}
    submit = submit_job(cluster, [
        "--working-dir", str(job_dir), "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "selftune", "search", "space.yaml", "--out", str(tmp_path / "runs"),
    ])
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()  # ray job submit waits for the job and exits 0 only on success
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("job").experiment_id
    kinds = [run.data.tags["selftune.kind"] for run in client.search_runs([experiment])]
    assert kinds.count("search") == 1 and kinds.count("trial") == 2 and kinds.count("stage") == 6
    assert all(run.info.status == "FINISHED" for run in client.search_runs([experiment]))
    # ...and the cluster refuses a client without its token.
    env = {**cluster["env"], "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN")
    listing = subprocess.run([cluster["ray"], "job", "list", "--address", cluster["address"]],
                             env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode != 0

