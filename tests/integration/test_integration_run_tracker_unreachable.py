"""The tracking server going away: logging failures are not fatal to training, one warning is
printed, what was not logged is collected (and handed from worker to driver as a file), an
unreachable server is not retried for minutes on every call, and an unreachable server at the start
is a one-line error (exit 2)."""

from __future__ import annotations

import logging
import pickle
import time

import pytest
import requests

from servers import free_port
from support import REPO
from selftune.tracking import RunTracker
from selftune.tracking import runs as runs_module


class FlakyClient:
    """Stands in for MlflowClient: fails like MLflow does (an MlflowException wrapping the requests
    error) while ``down`` is set, records calls otherwise."""

    def __init__(self):
        self.down = True
        self.calls: list[str] = []
        self.refuse = False

    def _call(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        self.calls.append(name)
        if self.refuse:
            raise MlflowException("INVALID_PARAMETER_VALUE: param changed", error_code="INVALID_PARAMETER_VALUE")
        if self.down:
            try:
                raise requests.exceptions.ConnectionError("Max retries exceeded: Connection refused")
            except requests.exceptions.ConnectionError as error:
                raise MlflowException(f"API request to http://mlflow:5000 failed with exception {error}") from None

    def log_batch(self, run_id, metrics=(), params=()):
        self._call("log_batch")

    def set_tag(self, run_id, key, value):
        self._call("set_tag")

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call("log_artifact")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """The module's per-process state (server down since, journal, warned once), reset per test."""
    monkeypatch.setattr(runs_module, "_down_since", None)
    monkeypatch.setattr(runs_module, "_journal", [])
    monkeypatch.setattr(runs_module, "_warned", False)


@pytest.fixture
def tracker():
    tracker = RunTracker("http://mlflow:5000", "r" * 32)
    tracker._client = FlakyClient()
    return tracker


def test_unreachable_server_is_not_fatal_and_warns_once(tracker, caplog):
    with caplog.at_level(logging.WARNING, logger="selftune.tracking.runs"):
        tracker.log_metrics({"train/loss": 1.0, "val/miou": 0.5}, step=1)
        tracker.log_metrics({"val/miou": 0.6}, step=2)
        tracker.log_params({"epochs": 3})
        tracker.set_tags({"selftune.stage": "supervised"})
        tracker.log_artifact("/tmp/confusion_matrix.png")
    assert tracker._client.calls == ["log_batch"], "calls after the first failure must be skipped, not retried"
    assert tracker.not_logged == [
        "metrics train/loss, val/miou (step 1)", "metrics val/miou (step 2)", "params epochs",
        "tag selftune.stage", "artifact /tmp/confusion_matrix.png",
    ]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "r" * 32 in warnings[0].getMessage() and "the work goes on" in warnings[0].getMessage()
    assert [item["kind"] for item in runs_module.not_logged()] == ["metrics", "metrics", "params", "tag", "artifact"]


def test_logging_resumes_when_the_server_is_back(tracker, monkeypatch):
    tracker.log_metrics({"val/miou": 0.5}, step=1)
    tracker._client.down = False
    tracker.log_metrics({"val/miou": 0.6}, step=2)  # within the re-probe interval: skipped
    assert tracker._client.calls == ["log_batch"]
    monkeypatch.setattr(runs_module, "_REPROBE_S", 0.0)
    monkeypatch.setattr(runs_module, "_server_healthy", lambda uri: True)
    tracker.log_metrics({"val/miou": 0.7}, step=3)
    tracker.set_tags({"k": "v"})
    assert tracker._client.calls == ["log_batch", "log_batch", "set_tag"]
    assert tracker.not_logged == ["metrics val/miou (step 1)", "metrics val/miou (step 2)"]


def test_a_refused_value_is_reported_but_later_calls_still_go_through(tracker, caplog):
    tracker._client.down = False
    tracker._client.refuse = True
    with caplog.at_level(logging.WARNING, logger="selftune.tracking.runs"):
        tracker.log_params({"lr": 0.1})
        tracker._client.refuse = False
        tracker.log_metrics({"val/miou": 0.5}, step=1)
    assert tracker._client.calls == ["log_batch", "log_batch"]
    assert tracker.not_logged == ["params lr"]
    assert "INVALID_PARAMETER_VALUE" in caplog.text


def test_real_mlflow_client_against_a_closed_port(monkeypatch):
    """The real client and error chain: MLflow's HTTP retries (shortened here) end in an exception
    that the tracker recognises as an unreachable server."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker = RunTracker(f"http://127.0.0.1:{free_port()}", "0" * 32)
    started = time.monotonic()
    tracker.log_metrics({"val/miou": 0.5}, step=1)
    tracker.log_metrics({"val/miou": 0.6}, step=2)
    assert time.monotonic() - started < 30
    assert runs_module.offline()
    assert tracker.not_logged == ["metrics val/miou (step 1)", "metrics val/miou (step 2)"]


def test_pickled_tracker_starts_fresh(tracker):
    tracker.log_metrics({"val/miou": 0.5}, step=1)
    copy = pickle.loads(pickle.dumps(tracker))
    assert copy.not_logged == [] and copy._client is None
    assert (copy.tracking_uri, copy.run_id) == (tracker.tracking_uri, tracker.run_id)


def test_nested_runs_that_cannot_be_created_or_ended_are_recorded_not_raised(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    assert runs_module.create_run(uri, "1", name="trial-x", kind="trial", parent_run_id="p" * 32, required=False) is None
    runs_module.finish_run(uri, "s" * 32, "FINISHED")
    runs_module.finish_run(uri, None, "FINISHED")  # never created: nothing more to record
    RunTracker(uri, None).log_metrics({"val/miou": 0.5}, step=1)
    kinds = [(item["kind"], item["what"]) for item in runs_module.not_logged()]
    assert kinds == [("run", f"trial run trial-x under run {'p' * 32}"), ("end", "end as FINISHED"),
                     ("metrics", "metrics val/miou (step 1)")]
    line = runs_module.describe_not_logged(runs_module.not_logged(), uri, "/x/not_logged.json")
    assert line.startswith(f"MLflow at {uri} was unreachable from ")
    assert line.endswith("not logged: 1 trial run (not created), 1 run end (left RUNNING), 1 metric batch (details in /x/not_logged.json)")
    with pytest.raises(Exception):
        runs_module.create_run(uri, "1", name="search-x", kind="search")  # a search's own run must exist


def test_not_logged_items_travel_from_worker_to_driver_as_a_file(tmp_path):
    runs_module._record("params", "params a", "r1", True, None)
    mark = len(runs_module.not_logged())
    runs_module._record("metrics", "metrics b (step 0)", "r2", True, None)
    runs_module.write_not_logged(tmp_path / "not_logged.json", runs_module.take_not_logged(mark))
    assert [item["what"] for item in runs_module.not_logged()] == ["params a"]
    runs_module.absorb_not_logged(tmp_path / "not_logged.json")
    assert [item["what"] for item in runs_module.not_logged()] == ["params a", "metrics b (step 0)"]
    assert not (tmp_path / "not_logged.json").exists()


def test_unreachable_server_at_the_start_is_a_one_line_error(tmp_path, capsys):
    from selftune.cli import main

    uri = f"http://127.0.0.1:{free_port()}"
    space = tmp_path / "space.yaml"
    space.write_text(f"pipeline: {REPO / 'pipelines' / 'quickstart.yaml'}\n"
                     "params: {stages.supervised.optimizer.lr: {type: float, low: 0.001, high: 0.01}}\n")
    started = time.monotonic()
    assert main(["search", str(space), "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    assert main(["run", str(REPO / "pipelines" / "quickstart.yaml"), "--tracking-uri", uri, "--out", str(tmp_path / "run")]) == 2
    assert time.monotonic() - started < 30
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("selftune: error: MLflow tracking server at " + uri) for line in errors)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
