"""The training core, free of Ray: optimizer and LR schedule, the step loop with hooks, evaluation.

A stage supplies ``compute_losses(model, batch, state) -> {term: weighted loss}``; ``fit`` sums the
terms, steps the optimizer and keeps per-term means on the device (one host sync per epoch, not
per step, so the loop does not stall the GPU). Everything else a stage needs around the steps —
EMA teachers, evaluation, best-checkpoint keeping, snapshots, logging, reporting — is a ``Hook``.

Hook call order (hooks are called in the order of the list given to ``fit``)::

    before_train
    for epoch in 1..epochs:            state.epoch = epoch
        before_epoch
        for each step:
            before_step
            forward (compute_losses), backward, optimizer step, LR schedule step
            after_step                 state.step = steps done so far
        after_epoch                    state.losses: the epoch's loss means; state.metrics: train/*,
                                       plus what earlier hooks added this epoch
    after_train

Given ``ctx.resume_state`` (a restarted Ray Train worker group's last checkpoint), ``fit`` loads
the model, optimizer, LR schedule and every hook's ``state_dict`` from it and continues with the
next epoch; ``state.snapshot()`` is what such a checkpoint holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selftune.config import OptimizerConfig
from selftune.engine.context import WorkerContext
from selftune.errors import SelftuneError
from selftune.metrics import ConfusionMatrix
from selftune.models import parameter_groups

Batch = Any  # a mapping of tensors, or a TwoStreamBatch (selftune.data.batches)
LossFn = Callable[[nn.Module, Batch, "TrainState"], dict[str, torch.Tensor]]


@dataclass
class TrainState:
    """Where training is: what ``compute_losses`` and hooks read instead of counting calls."""

    epochs: int
    steps_per_epoch: int
    epoch: int = 0  # the epoch being trained, 1-based (0 before training)
    step: int = 0  # optimisation steps done so far, over all epochs
    images: int = 0  # images this worker drew since this process started training (progress lines' images/s)
    losses: dict[str, float] = field(default_factory=dict)  # the last epoch's loss means
    metrics: dict[str, float] = field(default_factory=dict)  # the last epoch's metrics (hooks add to it)
    # What to checkpoint after an epoch (set by fit): hand it to ``ctx.report`` to make the epoch resumable.
    snapshot: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def epoch_index(self) -> int:
        """0-based epoch, for schedules over epochs."""
        return max(self.epoch - 1, 0)


class Hook:
    """Something done around the steps; every method is a no-op unless overridden."""

    def before_train(self, state: TrainState, model: nn.Module) -> None: ...

    def before_epoch(self, state: TrainState, model: nn.Module) -> None: ...

    def before_step(self, state: TrainState, model: nn.Module) -> None: ...

    def after_step(self, state: TrainState, model: nn.Module) -> None: ...

    def after_epoch(self, state: TrainState, model: nn.Module) -> None: ...

    def after_train(self, state: TrainState, model: nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        """What this hook must carry over a restart from a checkpoint (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingDiverged(SelftuneError, RuntimeError):
    """A loss became NaN or infinite: usually a learning rate too high for the model and data."""


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer; with ``head_lr_mult != 1`` the head is its own parameter group."""
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if config.head_lr_mult != 1.0:
        params = parameter_groups(model, config.lr, config.head_lr_mult)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int):
    """``poly``: lr · (1 - step/total)^power per step, as the DeepLab-family papers use."""
    if config.schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=config.poly_power)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def wrap_for_training(model: nn.Module, ctx: WorkerContext) -> nn.Module:
    """Move to the worker's device; wrap in DDP when there are several workers."""
    model = model.to(ctx.device)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (a batch object with its own ``to`` moves itself)."""
    if hasattr(batch, "to") and not isinstance(batch, (Mapping, torch.Tensor)):
        return batch.to(device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def images_in(batch: Batch) -> int:
    """Images in a batch (a two-stream batch: both streams); 0 when it has no ``image``."""
    if hasattr(batch, "labelled") and hasattr(batch, "unlabelled"):
        return images_in(batch.labelled) + images_in(batch.unlabelled)
    image = batch.get("image") if isinstance(batch, Mapping) else None
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


def fit(
    model: nn.Module,
    batches: Iterator[Batch],
    *,
    epochs: int,
    steps_per_epoch: int,
    compute_losses: LossFn,
    optimizer: OptimizerConfig,
    ctx: WorkerContext,
    hooks: Sequence[Hook] = (),
) -> TrainState:
    """Train ``model`` (moved to the device, DDP-wrapped with several workers) for ``epochs`` ×
    ``steps_per_epoch`` steps with an optimizer and LR schedule built from ``optimizer``; return the
    final state. Hooks see the wrapped network."""
    network = wrap_for_training(model, ctx)
    torch_optimizer = make_optimizer(network, optimizer)
    lr_schedule = make_lr_schedule(torch_optimizer, optimizer, epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if ctx.device.type == "cuda" and ctx.precision == "fp16" else None
    state = TrainState(epochs=epochs, steps_per_epoch=steps_per_epoch)
    parts = TrainingParts(network, torch_optimizer, lr_schedule, scaler, state, hooks)
    state.snapshot = parts.snapshot
    first_epoch = parts.restore(ctx.resume_state) + 1 if ctx.resume_state else 1
    _call(hooks, "before_train", state, network)
    for epoch in range(first_epoch, epochs + 1):
        state.epoch = epoch
        state.metrics = {}
        _call(hooks, "before_epoch", state, network)
        state.losses = train_steps(
            network, batches, steps=steps_per_epoch, compute_losses=compute_losses, optimizer=torch_optimizer,
            lr_schedule=lr_schedule, ctx=ctx, scaler=scaler, state=state, hooks=hooks,
        )
        state.metrics = {f"train/{k}" if k == "loss" else f"train/loss_{k}": v for k, v in state.losses.items()}
        _call(hooks, "after_epoch", state, network)
    _call(hooks, "after_train", state, network)
    return state


@dataclass
class TrainingParts:
    """Everything a restarted worker group needs to continue after the last reported epoch."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    scaler: torch.amp.GradScaler | None
    state: TrainState
    hooks: Sequence[Hook]

    def snapshot(self) -> dict[str, Any]:
        """The state after the current epoch. It holds the live tensors: save it at once."""
        return {
            "epoch": self.state.epoch, "step": self.state.step, "metrics": dict(self.state.metrics),
            # nn.Module's own state_dict: a network may narrow its own (a mean teacher's is the teacher's).
            "model": nn.Module.state_dict(unwrap(self.network)), "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "hooks": [hook.state_dict() for hook in self.hooks],
        }

    def restore(self, saved: dict[str, Any]) -> int:
        """Load ``saved`` (a snapshot); the epoch it was taken after."""
        nn.Module.load_state_dict(unwrap(self.network), saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_schedule.load_state_dict(saved["lr_schedule"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        for hook, hook_state in zip(self.hooks, saved["hooks"]):
            if hook_state is not None:
                hook.load_state_dict(hook_state)
        self.state.epoch, self.state.step, self.state.metrics = saved["epoch"], saved["step"], dict(saved["metrics"])
        return saved["epoch"]


def _call(hooks: Sequence[Hook], name: str, state: TrainState, model: nn.Module) -> None:
    for hook in hooks:
        getattr(hook, name)(state, model)


def train_steps(
    model: nn.Module,
    batches: Iterator[Batch],
    *,
    steps: int,
    compute_losses: LossFn,
    optimizer: torch.optim.Optimizer,
    lr_schedule,
    ctx: WorkerContext,
    scaler: torch.amp.GradScaler | None = None,
    state: TrainState | None = None,
    hooks: Sequence[Hook] = (),
) -> dict[str, float]:
    """Run ``steps`` optimisation steps; return the mean of each loss term and of their sum (``loss``)."""
    state = state or TrainState(epochs=1, steps_per_epoch=steps, epoch=1)
    model.train()
    totals: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        _call(hooks, "before_step", state, model)
        batch = next(batches)
        state.images += images_in(batch)
        batch = to_device(batch, ctx.device)
        with ctx.autocast():
            terms = compute_losses(model, batch, state)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr_schedule.step()
        state.step += 1
        _call(hooks, "after_step", state, model)
        for name, value in {"loss": loss, **terms}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float()
    means = {name: (total / steps).item() for name, total in totals.items()}
    if not all(math.isfinite(value) for value in means.values()):
        shown = ", ".join(f"{name} {value:.4g}" for name, value in means.items())
        raise TrainingDiverged(f"training diverged: the loss became non-finite ({shown}); lower the learning rate")
    return means


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    """Class probabilities (B, C, H, W) in float32."""
    with ctx.autocast():
        logits = model(images)
    return F.softmax(logits.float(), dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, ctx: WorkerContext) -> ConfusionMatrix:
    """Confusion matrix over this worker's shard of the evaluation set, summed across workers."""
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for batch in loader:
        batch = to_device(batch, ctx.device)
        with ctx.autocast():
            logits = model(batch["image"])
        confusion.update(logits.argmax(1), batch["mask"])
    confusion.all_reduce()
    return confusion
