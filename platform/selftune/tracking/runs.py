"""MLflow runs through ``MlflowClient`` with explicit run ids.

The fluent API (``mlflow.start_run``) keeps a process-global active-run stack; selftune's runs are
created in the driver and written to from Ray workers in other processes, so every call here
names its run id. The tracking URI is resolved once, absolutely, in the driver: Ray workers run in
other working directories, and MLflow's default ``sqlite:///mlflow.db`` is relative to the cwd.

A tracking server that goes away mid-run never stops the work. An unreachable server when a run or
search starts is a one-line error (``TrackingUnreachable``). Later, a nested run (trial, stage) that
cannot be created gets no id (``None``) and its trackers only record; a run that cannot be ended, a
metric batch, a param batch, a tag or an artifact that cannot be sent is recorded too. Records go to
this process's journal (``not_logged()``); other processes (Ray workers, Tune trials) hand theirs
over as JSON files (``take_not_logged`` / ``write_not_logged`` / ``absorb_not_logged``), and the CLI
ends with ``describe_not_logged``. Once the server is found unreachable, every call in this process
is skipped at once (MLflow retries each call for minutes) until a ``/health`` probe, at most every
``_REPROBE_S`` seconds, finds it back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from selftune.errors import ConfigError, SelftuneError

KIND_PIPELINE = "pipeline"
KIND_STAGE = "stage"
TAG_KIND = "selftune.kind"
_BATCH = 100  # MLflow accepts at most 1000 metrics / 100 params per log_batch call
_MAX_PARAM_LENGTH = 6000
_REPROBE_S = 60.0  # an unreachable server is probed again (GET /health, 2 s) at most this often
_log = logging.getLogger(__name__)
NOT_LOGGED = "not_logged.json"  # in a run's, stage's or search's folder: what MLflow did not get

# This process's view of the server: when it was last found unreachable (time.monotonic(), None =
# reachable), and what could not be logged (dicts: kind, what, run, at, unreachable).
_down_since: float | None = None
_journal: list[dict[str, Any]] = []
_warned = False


class TrackingUnreachable(SelftuneError):
    """The tracking server does not answer when a run or search starts (exit code 2)."""


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


def require_reachable(tracking_uri: str) -> None:
    """Fail fast (one line, naming the URI) when a tracking server does not answer ``/health`` or
    a database does not connect; make a SQLite store safe for several processes (``prepare_store``)."""
    from selftune.tracking.store import prepare_store

    prepare_store(tracking_uri)
    if not _server_healthy(tracking_uri):
        raise TrackingUnreachable(
            f"MLflow tracking server at {tracking_uri} is unreachable (GET /health failed); start it, "
            "or pass --tracking-uri / set MLFLOW_TRACKING_URI to one that answers")


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with an absolute artifact location) if missing."""
    require_reachable(tracking_uri)
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
    required: bool = True,
) -> str | None:
    """Create a RUNNING run tagged ``selftune.kind=<kind>``, nested under ``parent_run_id``.

    A ``required`` run (a search's or pipeline's own) must be created: errors raise. Otherwise (trial
    and stage runs, mid-search) a run that cannot be created is recorded as not logged and gets
    ``None``: the work goes on untracked."""
    all_tags = {TAG_KIND: kind, **{key: str(value) for key, value in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id

    def create() -> str:
        return client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags).info.run_id

    if required:
        return create()
    under = f" under run {parent_run_id}" if parent_run_id else ""
    return attempt(create, tracking_uri, "run", f"{kind} run {name}{under}", run=None)


def finish_run(tracking_uri: str, run_id: str | None, status: str, *, reason: str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED (with the reason as a tag, so the UI shows why).
    Never raises: a run that cannot be ended is recorded as not logged (it stays RUNNING)."""
    if run_id is None:
        return  # never created: already recorded

    def end() -> None:
        mlflow_client = client(tracking_uri)
        if reason:
            mlflow_client.set_tag(run_id, "selftune.error", reason[:5000])
        mlflow_client.set_terminated(run_id, status=status)

    attempt(end, tracking_uri, "end", f"end as {status}", run=run_id)


def attempt(call: Callable[[], Any], tracking_uri: str, kind: str, what: str, *, run: str | None, default: Any = None) -> Any:
    """``call()``, or when MLflow fails (unreachable, or refusing a value): record ``what`` as not
    logged (``kind``: run, end, metrics, params, tag, artifact, read), warn once, return ``default``.
    While the server is known to be unreachable the call is skipped at once."""
    global _down_since, _warned
    if _down_since is not None and not _back_online(tracking_uri):
        return _record(kind, what, run, True, default)
    try:
        result = call()
        _down_since = None
        return result
    except Exception as error:  # noqa: BLE001  (MlflowException, requests errors: never fatal to the work)
        unreachable = _is_unreachable(error)
        if unreachable:
            _down_since = time.monotonic()
        if not _warned:
            _warned = True
            _log.warning(
                "MLflow at %s: %s for run %s failed (%s: %s); the work goes on, and what is not logged is "
                "collected", tracking_uri, what, run, type(error).__name__,
                str(error).splitlines()[0][:300] if str(error) else "",
            )
        else:
            _log.debug("not logged: %s (run %s): %s", what, run, error)
        return _record(kind, what, run, unreachable, default)


def _record(kind: str, what: str, run: str | None, unreachable: bool, default: Any) -> Any:
    _journal.append({"kind": kind, "what": what, "run": run, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "unreachable": unreachable})
    return default


def offline() -> bool:
    """Whether this process last found the tracking server unreachable."""
    return _down_since is not None


def not_logged() -> list[dict[str, Any]]:
    """Everything this process (and the files it absorbed) could not log."""
    return list(_journal)


def take_not_logged(mark: int = 0) -> list[dict[str, Any]]:
    """Remove and return the records from ``mark`` (an earlier ``len(not_logged())``) on: what a
    worker hands over to the process that started it."""
    taken = _journal[mark:]
    del _journal[mark:]
    return taken


def write_not_logged(path: str | Path, items: list[dict[str, Any]]) -> None:
    """Write (or, if the file exists, extend) a not-logged file."""
    path = Path(path)
    earlier = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(earlier + items, indent=1))


def absorb_not_logged(path: str | Path) -> None:
    """Move a worker's not-logged file into this process's journal (the file is removed)."""
    path = Path(path)
    if path.exists():
        _journal.extend(json.loads(path.read_text()))
        path.unlink()


def describe_not_logged(items: list[dict[str, Any]], tracking_uri: str, details: str | Path | None = None) -> str:
    """One line: ``MLflow at URI was unreachable from 08:41:02: not logged: 2 trial runs, 14 metric
    batches, 3 artifacts (details in …)``; empty when everything was logged."""
    if not items:
        return ""
    names = {"run": "", "end": "run end (left RUNNING)", "metrics": "metric batch", "params": "param batch",
             "tag": "tag", "artifact": "artifact", "read": "read"}
    counts = Counter(  # in the order of names; a run not created is counted by its kind (trial, stage)
        f"{item['what'].split()[0]} run (not created)" if item["kind"] == "run" else names[item["kind"]]
        for item in sorted(items, key=lambda item: list(names).index(item["kind"])))
    parts = [f"{count} {_plural(name, count)}" for name, count in counts.items()]
    since = min(item["at"] for item in items)[-8:]
    how = "was unreachable" if any(item["unreachable"] for item in items) else "refused values"
    where = f" (details in {details})" if details else ""
    return f"MLflow at {tracking_uri} {how} from {since}: not logged: {', '.join(parts)}{where}"


def _plural(name: str, count: int) -> str:
    if count == 1:
        return name
    head, _, tail = name.partition(" (")
    head = head + ("es" if head.endswith("batch") else "s")
    return f"{head} ({tail}" if tail else head


class RunTracker:
    """Logs to one MLflow run. Cheap to pickle: the client is created on first use in each process.

    Logging is never fatal to training: when a call fails (the tracking server is unreachable after
    MLflow's own HTTP retries, or refuses a value), one warning names the run and the error, and
    ``not_logged`` lists every item of this run that was lost (the process's journal gets them
    too). While the server is unreachable, later calls are skipped at once (see ``attempt``).
    A tracker for a run that was never created (``run_id=None``) only records."""

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self.not_logged: list[str] = []

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None, "not_logged": []}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items() if value is not None]
        for start in range(0, len(entries), _BATCH):
            batch = entries[start:start + _BATCH]
            self._send("metrics", f"metrics {', '.join(m.key for m in batch)} (step {step or 0})",
                       lambda: self.client.log_batch(self.run_id, metrics=batch))

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which ``key`` has been logged to this run (none when it cannot be read)."""
        if self.run_id is None:
            return set()
        history = attempt(lambda: self.client.get_metric_history(self.run_id, key), self.tracking_uri, "read",
                          f"metric history {key}", run=self.run_id, default=[])
        return {point.step for point in history}

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH):
            batch = entries[start:start + _BATCH]
            self._send("params", f"params {', '.join(p.key for p in batch)}", lambda: self.client.log_batch(self.run_id, params=batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._send("tag", f"tag {key}", lambda: self.client.set_tag(self.run_id, key, str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send("artifact", f"artifact {path}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    def _send(self, kind: str, what: str, call) -> None:
        failed = object()
        if self.run_id is None:
            outcome = _record(kind, what, None, offline(), failed)
        else:
            outcome = attempt(call, self.tracking_uri, kind, what, run=self.run_id, default=failed)
        if outcome is failed:
            self.not_logged.append(what)


def _back_online(tracking_uri: str) -> bool:
    """Probe a server found unreachable, at most every ``_REPROBE_S`` seconds."""
    global _down_since
    if time.monotonic() - _down_since < _REPROBE_S:
        return False
    _down_since = time.monotonic()
    return _server_healthy(tracking_uri)


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

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        pass
