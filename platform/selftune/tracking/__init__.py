"""MLflow tracking: the run tree (pipeline -> stage runs), the names selftune logs under, and a
tracker that rank-0 workers use (non-zero ranks get a null tracker instead of rank branches)."""

from selftune.tracking.runs import (
    KIND_PIPELINE,
    KIND_STAGE,
    NOT_LOGGED,
    NullTracker,
    RunTracker,
    TrackingUnreachable,
    absorb_not_logged,
    attempt,
    client,
    create_run,
    describe_not_logged,
    ensure_experiment,
    finish_run,
    not_logged,
    offline,
    require_reachable,
    resolve_tracking_uri,
    take_not_logged,
    write_not_logged,
)
from selftune.tracking.store import StoreUnreachable, prepare_store

__all__ = [
    "KIND_PIPELINE", "KIND_STAGE", "NOT_LOGGED", "NullTracker", "RunTracker", "TrackingUnreachable", "absorb_not_logged",
    "attempt", "client", "create_run", "describe_not_logged", "ensure_experiment", "finish_run", "not_logged", "offline",
    "prepare_store", "require_reachable", "resolve_tracking_uri", "StoreUnreachable", "take_not_logged", "write_not_logged",
]
