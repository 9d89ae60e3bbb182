"""``fit``: hooks are called in the documented order, and the loss sees the training state."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from selftune.config import OptimizerConfig
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, TrainState, TrainingDiverged, fit


class Recorder(Hook):
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getattribute__(self, attribute):
        if attribute in ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train"):
            return lambda state, model: self.log.append((self.name, attribute, state.epoch, state.step))
        return super().__getattribute__(attribute)


def _batches():
    torch.manual_seed(0)
    x = torch.randn(4, 2)
    return itertools.repeat({"x": x, "y": x.sum(dim=1, keepdim=True)})


def _loss(seen: list):
    def compute(model, batch, state: TrainState):
        seen.append((state.epoch, state.step))
        return {"mse": ((model(batch["x"]) - batch["y"]) ** 2).mean()}

    return compute


def test_hooks_run_in_the_documented_order_and_the_loss_sees_epoch_and_step():
    log, seen = [], []
    state = fit(nn.Linear(2, 1), _batches(), epochs=2, steps_per_epoch=2, compute_losses=_loss(seen),
                optimizer=OptimizerConfig(lr=0.01), ctx=WorkerContext.local("cpu"),
                hooks=[Recorder("a", log), Recorder("b", log)])
    events = [(name, event, epoch, step) for name, event, epoch, step in log if name == "a"]
    assert events == [
        ("a", "before_train", 0, 0),
        ("a", "before_epoch", 1, 0), ("a", "before_step", 1, 0), ("a", "after_step", 1, 1),
        ("a", "before_step", 1, 1), ("a", "after_step", 1, 2), ("a", "after_epoch", 1, 2),
        ("a", "before_epoch", 2, 2), ("a", "before_step", 2, 2), ("a", "after_step", 2, 3),
        ("a", "before_step", 2, 3), ("a", "after_step", 2, 4), ("a", "after_epoch", 2, 4),
        ("a", "after_train", 2, 4),
    ]
    # Every event reaches the hooks in list order: a before b.
    assert [name for name, *_ in log] == ["a", "b"] * (len(log) // 2)
    assert seen == [(1, 0), (1, 1), (2, 2), (2, 3)]  # (epoch, steps done before this one)
    assert state.step == 4 and set(state.metrics) == {"train/loss", "train/loss_mse"}


def test_after_epoch_hooks_see_and_extend_the_epochs_metrics():
    class AddsMetric(Hook):
        def after_epoch(self, state, model):
            state.metrics["val/fake"] = 0.5

    class ReadsMetrics(Hook):
        seen: list = []

        def after_epoch(self, state, model):
            self.seen.append(dict(state.metrics))

    reader = ReadsMetrics()
    fit(nn.Linear(2, 1), _batches(), epochs=1, steps_per_epoch=1, compute_losses=_loss([]),
        optimizer=OptimizerConfig(lr=0.01), ctx=WorkerContext.local("cpu"), hooks=[AddsMetric(), reader])
    (metrics,) = reader.seen
    assert metrics["val/fake"] == 0.5 and metrics["train/loss"] == metrics["train/loss_mse"]


def test_a_non_finite_loss_ends_training_with_one_clear_error():
    def nan_loss(model, batch, state):
        return {"mse": model(batch["x"]).sum() * float("nan")}

    with pytest.raises(TrainingDiverged, match="training diverged.*lower the learning rate"):
        fit(nn.Linear(2, 1), _batches(), epochs=1, steps_per_epoch=1, compute_losses=nan_loss,
            optimizer=OptimizerConfig(lr=0.01), ctx=WorkerContext.local("cpu"))


def test_head_lr_mult_gives_the_head_its_own_group_at_that_multiple():
    from selftune.engine.loop import make_optimizer
    from selftune.models import build_model

    model = build_model("small_segnet", 3, width=8)
    flat = make_optimizer(model, OptimizerConfig(lr=0.01))
    assert len(flat.param_groups) == 1  # the default: one group, as before
    grouped = make_optimizer(model, OptimizerConfig(lr=0.01, head_lr_mult=10.0))
    lrs = sorted(group["lr"] for group in grouped.param_groups)
    assert lrs == [0.01, pytest.approx(0.1)]
    head = {id(p) for p in model.head.parameters()}
    (head_group,) = [g for g in grouped.param_groups if g["lr"] == pytest.approx(0.1)]
    assert {id(p) for p in head_group["params"]} == head
    assert sum(len(g["params"]) for g in grouped.param_groups) == len(list(model.parameters()))


class Counter(Hook):
    """A hook with state of its own: how many epochs it has seen."""

    def __init__(self):
        self.epochs_seen = 0

    def after_epoch(self, state, model):
        self.epochs_seen += 1

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]


class Snapshots(Hook):
    """What ``ReportEpoch`` hands Ray Train on a worker group: the state after each epoch."""

    def __init__(self):
        self.taken = []

    def after_epoch(self, state, model):  # saved as Ray Train's checkpoint is: the snapshot holds live tensors
        saved = io.BytesIO()
        torch.save(state.snapshot(), saved)
        saved.seek(0)
        self.taken.append(torch.load(saved, weights_only=True))


def test_a_restart_from_an_epochs_snapshot_continues_after_it_as_if_never_stopped():
    def train(epochs, resume_state=None):
        torch.manual_seed(0)
        model, counter, snapshots, seen = nn.Linear(2, 1), Counter(), Snapshots(), []
        ctx = WorkerContext.local("cpu")
        ctx.resume_state = resume_state
        state = fit(model, _batches(), epochs=epochs, steps_per_epoch=2, compute_losses=_loss(seen),
                    optimizer=OptimizerConfig(lr=0.05, schedule="poly"), ctx=ctx, hooks=[counter, snapshots])
        return model, state, counter, snapshots, seen

    whole, whole_state, _, snapshots, _ = train(3)
    resumed, state, counter, _, seen = train(3, resume_state=snapshots.taken[0])  # restarted after epoch 1
    assert seen == [(2, 2), (2, 3), (3, 4), (3, 5)]  # epochs 2 and 3 only, the step count carried on
    assert counter.epochs_seen == 3 and state.step == whole_state.step == 6
    # Same weights as the uninterrupted run: model, Adam's moments and the poly LR all came back.
    assert torch.allclose(resumed.weight, whole.weight) and torch.allclose(resumed.bias, whole.bias)
