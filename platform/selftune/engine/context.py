"""What a stage's code knows about where it runs: rank, world size, device, its tracker, and how
to report to Ray Train. The stage code never imports Ray; ``selftune.engine.ray_train`` builds
this context from ``ray.train.get_context()``, and ``WorkerContext.local()`` builds one for bare
PyTorch use (benchmarks, tests, the GPU box without Ray)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch

from selftune.tracking import NullTracker


Snapshot = Callable[[], dict[str, Any]]  # the training state to resume from (see engine.loop.fit)


def _no_report(metrics: Mapping[str, Any], snapshot: Snapshot | None = None) -> None:
    pass


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # autocast dtype on CUDA: fp32 (off), bf16 or fp16
    tracker: Any = field(default_factory=NullTracker)  # RunTracker on rank 0, NullTracker elsewhere
    # A barrier under Ray Train: all ranks call it. With a worker group, rank 0's ``snapshot()`` is
    # saved as the run's checkpoint, so a restarted group resumes from it (``resume_state``).
    report: Callable[[Mapping[str, Any], Snapshot | None], None] = _no_report
    restartable: bool = False  # a worker group: Ray Train restarts it after a failure, from resume_state
    resume_state: dict[str, Any] | None = None  # the last reported snapshot, after a restart
    attempt: int = 1  # this worker group's start: 2 and up after a restart

    @classmethod
    def local(cls, device: str | torch.device | None = None, precision: str = "bf16", tracker: Any = None) -> "WorkerContext":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(device=device, precision=precision if device.type == "cuda" else "fp32", tracker=tracker or NullTracker())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def resumed_from_epoch(self) -> int:
        """The epoch a restarted worker group continued after (0: it started from the beginning)."""
        return int(self.resume_state["epoch"]) if self.resume_state else 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> ContextManager:
        """Mixed precision on GPU; a no-op on CPU (CPU autocast is slower than fp32 for these convs)."""
        if self.device.type != "cuda" or self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def log(self, message: str) -> None:
        """One line on rank 0's stdout. Not ``print``: Ray Train patches it in its workers to
        both print and log each message, which a terminal then showed twice."""
        if self.is_main:
            sys.stdout.write(message + "\n")
            sys.stdout.flush()
