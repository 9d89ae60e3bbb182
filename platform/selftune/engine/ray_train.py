"""Ray Train at the edge: every stage runs as one ``TorchTrainer.fit()``.

``workers: 0`` is Ray Train's local mode (the function runs in this process, ~0.1 s overhead: the
CPU default); ``workers: N`` starts N DDP workers (gloo on CPU, NCCL with ``use_gpu``). The same
per-worker function serves both; it turns Ray's context into a ``WorkerContext`` and calls the
stage function registered for the stage's kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selftune.config import ResourcesConfig
from selftune.engine.cluster import ensure_ray
from selftune.engine.context import WorkerContext
from selftune.errors import SelftuneError
from selftune.stages import StageJob, stage_function
from selftune import tracking
from selftune.tracking import NullTracker, RunTracker


def run_stage(job: StageJob, resources: ResourcesConfig, *, storage_path: str | Path) -> dict[str, Any]:
    """Run ``job`` through Ray Train and return the summary its rank-0 worker wrote."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if resources.workers > 0:
        ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "precision": resources.precision},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            # Deterministic name: re-running the same stage folder resumes rather than duplicates.
            name=f"{Path(job.output_dir).name}",
            storage_path=str(Path(storage_path).resolve()),
        ),
    )
    try:
        trainer.fit()
    except Exception as error:
        raise unwrap_worker_error(error) from None
    return job.read_summary()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker (or in-process in local mode)."""
    import ray.train
    import ray.train.torch

    import selftune.stages  # noqa: F401  (registers every stage kind in a fresh worker process)

    job: StageJob = config["job"]
    ray_context = ray.train.get_context()
    rank, world_size = ray_context.get_world_rank(), ray_context.get_world_size()
    tracker = RunTracker(job.tracking_uri, job.run_id) if rank == 0 and job.run_id else NullTracker()
    device = ray.train.torch.get_device()
    ctx = WorkerContext(
        rank=rank, world_size=world_size, device=device, tracker=tracker,
        precision=config["precision"] if device.type == "cuda" else "fp32",
        report=lambda metrics: ray.train.report(dict(metrics)),
    )
    mark = len(tracking.not_logged())
    try:
        stage_function(job.stage.kind)(job, ctx)
    finally:  # what this worker could not log goes to the stage folder; the stage's starter absorbs it
        if rank == 0 and len(tracking.not_logged()) > mark:
            tracking.write_not_logged(job.output(tracking.NOT_LOGGED), tracking.take_not_logged(mark))


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
