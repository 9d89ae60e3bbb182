"""MLflow runs through ``MlflowClient`` with explicit run ids.

The fluent API (``mlflow.start_run``) keeps a process-global active-run stack; selftune's runs are
created in the driver and written to from Ray workers in other processes, so every call here
names its run id. The tracking URI is resolved once, absolutely, in the driver: Ray workers run in
other working directories, and MLflow's default ``sqlite:///mlflow.db`` is relative to the cwd.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from selftune.errors import ConfigError

KIND_PIPELINE = "pipeline"
KIND_STAGE = "stage"
TAG_KIND = "selftune.kind"
_BATCH = 100  # MLflow accepts at most 1000 metrics / 100 params per log_batch call
_MAX_PARAM_LENGTH = 6000


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
    """Logs to one MLflow run. Cheap to pickle: the client is created on first use in each process."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items() if value is not None]
        for start in range(0, len(entries), _BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start:start + _BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)


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
