"""The Ray instance selftune runs on: the cluster of a Ray job (``RAY_ADDRESS``), or a private local
instance that this process starts and owns."""

from __future__ import annotations

import os


def ensure_ray(*, worker_output: bool = True) -> None:
    """Join the cluster this process belongs to (``RAY_ADDRESS``, e.g. inside a Ray job), or start a
    local one sized to this machine. ``worker_output=False`` keeps workers' prints (Ray Train's
    per-report lines) off this terminal: a search prints its own progress."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": "WARNING", "log_to_driver": worker_output}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        # address="local": always a private instance, never a `ray start` cluster that happens to
        # run on this machine (set RAY_ADDRESS=auto to use that one).
        ray.init(address="local", include_dashboard=False, configure_logging=True, **quiet)
