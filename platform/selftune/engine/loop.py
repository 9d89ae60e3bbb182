"""The training core, free of Ray: optimizer and LR schedule, the step loop, evaluation.

A stage supplies ``compute_losses(model, batch) -> {term: weighted loss}``; the loop sums the
terms, steps the optimizer and keeps per-term means on the device (one host sync per epoch, not
per step, so the loop does not stall the GPU).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selftune.config import OptimizerConfig
from selftune.engine.context import WorkerContext
from selftune.errors import SelftuneError
from selftune.metrics import ConfusionMatrix

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], dict[str, torch.Tensor]]


class TrainingDiverged(SelftuneError, RuntimeError):
    """A loss became NaN or infinite: usually a learning rate too high for the model and data."""


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
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


def to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
) -> dict[str, float]:
    """Run ``steps`` optimisation steps; return the mean of each loss term and of their sum (``loss``)."""
    model.train()
    totals: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        batch = to_device(next(batches), ctx.device)
        with ctx.autocast():
            terms = compute_losses(model, batch)
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


def cycle(loader) -> Iterator[Batch]:
    """Endless batches; a DistributedSampler gets a new epoch (and shuffle) on every pass."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
