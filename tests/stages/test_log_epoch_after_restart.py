"""A restarted worker group logs each epoch's metrics once (issue 12 item 6).

Ray Train registers a reported checkpoint asynchronously, so a group killed just after logging
epoch k can restart from epoch k-1 and train epoch k again; or it can die between reporting an
epoch and logging it, and restart from that epoch. Both are driven here through the real ``fit``
and its snapshot / restore, with a tracker that remembers what an earlier attempt logged.
"""

from __future__ import annotations

import itertools
from collections import Counter

import torch
from torch import nn

from selftune.config import OptimizerConfig
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, fit
from selftune.stages.training import LogEpoch


class RememberingTracker:
    """The stage's MLflow run as far as LogEpoch sees it: metric points by key and step."""

    def __init__(self) -> None:
        self.points: list[tuple[str, int]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.points += [(key, step or 0) for key in metrics]

    def logged_steps(self, key: str) -> set[int]:
        return {step for logged, step in self.points if logged == key}


class SnapshotAfter(Hook):
    """Keeps the snapshot a worker group reports after each epoch."""

    def __init__(self) -> None:
        self.snapshots: dict[int, dict] = {}

    def after_epoch(self, state, model) -> None:
        self.snapshots[state.epoch] = state.snapshot()


def train(tracker: RememberingTracker, epochs: int, *, attempt: int = 1, resume_state: dict | None = None) -> SnapshotAfter:
    torch.manual_seed(0)
    x = torch.randn(4, 2)
    batches = itertools.repeat({"x": x, "y": x.sum(dim=1, keepdim=True)})
    keep = SnapshotAfter()
    ctx = WorkerContext(tracker=tracker, attempt=attempt, resume_state=resume_state, restartable=True)
    fit(nn.Linear(2, 1), batches, epochs=epochs, steps_per_epoch=2,
        compute_losses=lambda model, batch, state: {"mse": ((model(batch["x"]) - batch["y"]) ** 2).mean()},
        optimizer=OptimizerConfig(lr=0.01), ctx=ctx, hooks=[keep, LogEpoch(ctx, "supervised")])
    return keep


def epochs_logged(tracker: RememberingTracker) -> Counter:
    return Counter(step for key, step in tracker.points if key == "train/loss")


def test_an_epoch_trained_again_after_a_restart_is_not_logged_again():
    tracker = RememberingTracker()
    first = train(tracker, epochs=2)  # the lost attempt logged epochs 1 and 2; Ray had registered only epoch 1
    train(tracker, epochs=3, attempt=2, resume_state=first.snapshots[1])
    assert epochs_logged(tracker) == {1: 1, 2: 1, 3: 1}


def test_an_epoch_reported_but_not_logged_before_the_kill_is_logged_from_the_snapshot():
    tracker = RememberingTracker()
    first = train(tracker, epochs=2)
    tracker.points = [point for point in tracker.points if point[1] != 2]  # died between epoch 2's report and its log
    train(tracker, epochs=3, attempt=2, resume_state=first.snapshots[2])
    assert epochs_logged(tracker) == {1: 1, 2: 1, 3: 1}
    assert ("train/loss_mse", 2) in tracker.points  # the whole epoch's metrics, from the snapshot


def test_a_first_attempt_logs_every_epoch_without_reading_the_run():
    class WriteOnly(RememberingTracker):
        def logged_steps(self, key: str) -> set[int]:
            raise AssertionError("a first attempt has nothing logged to read")

    tracker = WriteOnly()
    train(tracker, epochs=2)
    assert epochs_logged(tracker) == {1: 1, 2: 1}
