"""Ray Train at the edge: every stage runs as one ``TorchTrainer.fit()``.

``workers: 0`` is Ray Train's local mode (the function runs in this process, ~0.1 s overhead: the
CPU default); ``workers: N`` starts N DDP workers (gloo on CPU, NCCL with ``use_gpu``). The same
per-worker function serves both: it turns Ray's context into a ``WorkerContext`` and calls the
function it was given, ``work(payload, ctx)``. This module knows nothing of stages: the runner
(``selftune.runner``) hands it the stage function and the stage's job as the payload.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from selftune import tracking
from selftune.config import ResourcesConfig
from selftune.engine.cluster import ensure_ray, on_local_instance
from selftune.engine.context import Snapshot, WorkerContext
from selftune.errors import SelftuneError
from selftune.tracking import NullTracker, RunTracker

STATE_FILE = "training_state.pt"  # in a Ray Train checkpoint: the snapshot of engine.loop.fit
STARTS_FILE = ".worker_group_starts"  # in the stage folder: how often its worker group started
# Ray Train's controller checks its workers every 2 s by default, so a stage waited up to 2 s for its
# workers to be placed and ~2 s after its loop had ended. At 0.2 s an empty 1-worker fit() took 7.0 s
# instead of 10.0 s on 2 cores (benchmarks/engine_overhead.py prints the breakdown); a check is one
# small actor call. Ray passes the variable from the process calling fit() to the controller and the
# workers; a value the user set wins.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_SECONDS = "0.2"
# What Ray Train starts for every stage that does nothing on selftune's local instance: the
# placement-group cleaner, one more process, asks the state API every second whether the controller
# lives (there is no dashboard to answer: a warning a second on the terminal, and the cleanup can
# never happen); the metrics callbacks feed a metrics agent that is off; the preemption watcher, one
# more process, waits for a node drain that one machine never sees. Empty 1-worker fits on 2 cores:
# 7.3 s with the callbacks, 5.7 s without. Ray has a switch for the watcher only.
IDLE_LOCALLY = ("PlacementGroupCleanerCallback", "ControllerMetricsCallback", "WorkerMetricsCallback")
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@dataclass(frozen=True)
class WorkOrder:
    """What every worker runs: ``work(payload, ctx)``, with rank 0 logging to ``run_id``."""

    work: Callable[[Any, WorkerContext], Any]  # a module-level function (pickled by reference)
    payload: Any
    output_dir: str  # where rank 0 leaves what it could not log (tracking.NOT_LOGGED)
    tracking_uri: str | None = None
    run_id: str | None = None


def run_on_ray_train(order: WorkOrder, resources: ResourcesConfig, *, name: str, storage_path: str | Path) -> None:
    """Run ``order`` on every worker of one ``TorchTrainer.fit()``; a worker's exception is re-raised."""
    import ray.train

    group = resources.workers > 0  # a worker group can lose a worker (or a node) and be restarted
    if group:
        ensure_ray(temp_dir=storage_path)
        os.environ.setdefault(POLL_ENV, POLL_SECONDS)
    lean = group and on_local_instance()
    if lean:
        os.environ.setdefault(PREEMPTION_ENV, "0")
    trainer = _trainer_class(lean=lean)(
        train_loop_per_worker,
        train_loop_config={"order": order, "precision": resources.precision, "restartable": group,
                           "threads": max(1, int(resources.cpus_per_worker))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
        ),
        # Deterministic name: re-running the same stage folder resumes rather than duplicates.
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures if group else 0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # only the last epoch's is resumed from
        ),
    )
    # fit() would install a SIGINT handler of its own that aborts the run and exits 1 (runs FAILED):
    # Ctrl-C must raise KeyboardInterrupt here, as SIGTERM does, so the runs end KILLED and exit 130.
    trainer._register_sigint_handler = lambda controller: None
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except Exception as error:
        raise unwrap_worker_error(error) from None
    finally:  # whatever handler fit() left (local mode, another Ray version): Ctrl-C must stay ours
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)


@functools.cache
def _trainer_class(*, lean: bool) -> type:
    """``TorchTrainer``; ``lean``: without the callbacks in ``IDLE_LOCALLY`` (Ray has no switch for
    the cleaner; if a later Ray renames them, nothing is dropped)."""
    from ray.train.torch import TorchTrainer

    if not lean:
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in IDLE_LOCALLY]

    return LocalTorchTrainer


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker (or in-process in local mode)."""
    import ray.train
    import ray.train.torch

    order: WorkOrder = config["order"]
    if config["restartable"]:  # a worker process of a group: as many torch threads as its CPUs
        import torch  # (Ray's OMP_NUM_THREADS or the user's may say otherwise; local mode keeps the caller's)

        torch.set_num_threads(config["threads"])
    ray_context = ray.train.get_context()
    rank, world_size = ray_context.get_world_rank(), ray_context.get_world_size()
    tracker = RunTracker(order.tracking_uri, order.run_id) if rank == 0 and order.run_id else NullTracker()
    device = ray.train.torch.get_device()
    restartable = config["restartable"]
    ctx = WorkerContext(
        rank=rank, world_size=world_size, device=device, tracker=tracker,
        precision=config["precision"] if device.type == "cuda" else "fp32",
        report=_reporter(rank, restartable), restartable=restartable,
        resume_state=_resume_state(ray.train.get_checkpoint()) if restartable else None,
        attempt=_count_start(Path(order.output_dir), rank) if restartable else 1,
    )
    mark = len(tracking.not_logged())
    try:
        order.work(order.payload, ctx)
    finally:  # what this worker could not log goes to the stage folder; the stage's starter absorbs it
        if rank == 0 and len(tracking.not_logged()) > mark:
            tracking.write_not_logged(Path(order.output_dir) / tracking.NOT_LOGGED, tracking.take_not_logged(mark))


def _reporter(rank: int, checkpoints: bool) -> Callable[[Mapping[str, Any], Snapshot | None], None]:
    """``ray.train.report``; with ``checkpoints``, rank 0's snapshot goes with it as the checkpoint
    a restarted worker group resumes from (the other ranks report none: the state is the same)."""
    import ray.train
    import torch

    def report(metrics: Mapping[str, Any], snapshot: Snapshot | None = None) -> None:
        if not checkpoints or snapshot is None:
            ray.train.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save(snapshot(), Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(dict(metrics), checkpoint=checkpoint)

    return report


def _resume_state(checkpoint) -> dict[str, Any] | None:
    """The snapshot in the run's latest checkpoint (after a restart), on the CPU."""
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _count_start(folder: Path, rank: int) -> int:
    """This start of the stage's worker group, 1-based: rank 0 counts them in the stage folder."""
    path = folder / STARTS_FILE
    if rank != 0:
        return 1  # only rank 0 writes the summary
    starts = int(path.read_text()) + 1 if path.is_file() else 1
    path.write_text(str(starts))
    return starts


def unwrap_worker_error(error: BaseException) -> BaseException:
    """Ray wraps worker exceptions in ``WorkerGroupError``; hand back the user-facing one (a
    ``SelftuneError`` from rank 0 first) so the CLI can print it as one line."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], SelftuneError):
            return failures[rank]
    if failures:
        return failures[min(failures)]
    return error
