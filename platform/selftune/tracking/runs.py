"""MLflow runs through ``MlflowClient`` with explicit run ids.

The fluent API (``mlflow.start_run``) keeps a process-global active-run stack; selftune's runs are
created in the driver and written to from Ray workers in other processes, so every call here
names its run id. The tracking URI is resolved once, absolutely, in the driver: Ray workers run in
other working directories, and MLflow's default ``sqlite:///mlflow.db`` is relative to the cwd.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from selftune.errors import ConfigError

KIND_PIPELINE = "pipeline"
KIND_STAGE = "stage"
TAG_KIND = "selftune.kind"
_BATCH = 100  # MLflow accepts at most 1000 metrics / 100 params per log_batch call
_MAX_PARAM_LENGTH = 6000
_REPROBE_S = 60.0  # an unreachable server is probed again (GET /health, 2 s) at most this often
_log = logging.getLogger(__name__)


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``, made absolute."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking URI {uri!r}: MLflow 3 no longer accepts a file store; use sqlite:///PATH.db or http://HOST:PORT"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///"):]
        uri = "sqlite:///" + str(Path(relative).resolve())
    return uri


def client(tracking_uri: str):
    from mlflow import MlflowClient  # imported lazily: mlflow costs ~1 s to import

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with an absolute artifact location) if missing."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return mlflow_client.create_experiment(name)


def create_run(
    tracking_uri: str,
    experiment_id: str,
    *,
    name: str,
    kind: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create a RUNNING run tagged ``selftune.kind=<kind>``, nested under ``parent_run_id``."""
    all_tags = {TAG_KIND: kind, **{key: str(value) for key, value in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def finish_run(tracking_uri: str, run_id: str, status: str, *, reason: str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED (with the reason as a tag, so the UI shows why)."""
    mlflow_client = client(tracking_uri)
    if reason:
        mlflow_client.set_tag(run_id, "selftune.error", reason[:5000])
    mlflow_client.set_terminated(run_id, status=status)


class RunTracker:
    """Logs to one MLflow run. Cheap to pickle: the client is created on first use in each process.

    Logging is never fatal to training: when a call fails (the tracking server is unreachable after
    MLflow's own HTTP retries, or refuses a value), one warning names the run and the error, and
    ``not_logged`` lists every item that was lost. While the server is unreachable, later calls are
    skipped at once (not retried for minutes each); a quick ``/health`` probe, at most every
    ``_REPROBE_S`` seconds, resumes logging once it is back."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self.not_logged: list[str] = []
        self._unreachable_since: float | None = None
        self._warned = False

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None,
                "not_logged": [], "_unreachable_since": None, "_warned": False}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items() if value is not None]
        for start in range(0, len(entries), _BATCH):
            batch = entries[start:start + _BATCH]
            self._send(f"metrics {', '.join(m.key for m in batch)} (step {step or 0})",
                       lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH):
            batch = entries[start:start + _BATCH]
            self._send(f"params {', '.join(p.key for p in batch)}", lambda: self.client.log_batch(self.run_id, params=batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._send(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(f"artifact {path}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    def _send(self, what: str, call) -> None:
        if self._unreachable_since is not None and not self._back_online():
            self.not_logged.append(what)
            return
        try:
            call()
            self._unreachable_since = None
        except Exception as error:  # noqa: BLE001  (MlflowException, requests errors: never fatal to training)
            self.not_logged.append(what)
            if _is_unreachable(error):
                self._unreachable_since = time.monotonic()
            if not self._warned:
                self._warned = True
                _log.warning(
                    "MLflow run %s at %s: logging failed (%s: %s); training goes on, and what is not logged "
                    "is collected (first: %s)", self.run_id, self.tracking_uri, type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "", what,
                )

    def _back_online(self) -> bool:
        if time.monotonic() - self._unreachable_since < _REPROBE_S:
            return False
        self._unreachable_since = time.monotonic()
        return _server_healthy(self.tracking_uri)


def _is_unreachable(error: BaseException) -> bool:
    """A connection failure or timeout anywhere in the exception chain (MLflow wraps them)."""
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _server_healthy(tracking_uri: str) -> bool:
    if not tracking_uri.startswith(("http://", "https://")):
        return True  # a database URI: just try again
    import requests

    try:
        return requests.get(tracking_uri.rstrip("/") + "/health", timeout=2).status_code == 200
    except requests.exceptions.RequestException:
        return False


class NullTracker:
    """What non-zero ranks (and untracked runs) get: every call does nothing."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        pass
