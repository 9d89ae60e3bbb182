"""MLflow tracking: the run tree (pipeline -> stage runs), the names selftune logs under, and a
tracker that rank-0 workers use (non-zero ranks get a null tracker instead of rank branches)."""

from selftune.tracking.runs import (
    KIND_PIPELINE,
    KIND_STAGE,
    NullTracker,
    RunTracker,
    client,
    create_run,
    ensure_experiment,
    finish_run,
    resolve_tracking_uri,
)

__all__ = [
    "KIND_PIPELINE", "KIND_STAGE", "NullTracker", "RunTracker", "client", "create_run", "ensure_experiment",
    "finish_run", "resolve_tracking_uri",
]
