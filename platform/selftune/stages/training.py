"""What every training stage shares: build (or fine-tune) the model, run epochs of steps, evaluate
val mIoU after each epoch, keep the best checkpoint, log to MLflow, write the summary.

A training stage only says which batches to draw and how to turn a batch into loss terms.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selftune.config import TrainingStageConfig
from selftune.engine.context import WorkerContext
from selftune.engine.loop import (
    Batch,
    LossFn,
    evaluate,
    make_lr_schedule,
    make_optimizer,
    train_steps,
    unwrap,
    wrap_for_training,
)
from selftune.metrics import ConfusionMatrix, plot_confusion_matrix
from selftune.models import build_model, load_checkpoint, save_checkpoint
from selftune.stages.data import StageData, evaluation_loader
from selftune.stages.job import CHECKPOINT, StageJob


def initial_model(job: StageJob, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Fresh weights from the pipeline's model config, or the ``init`` stage's best checkpoint."""
    if "init" in job.inputs:
        return load_checkpoint(Path(job.inputs["init"]))
    config = job.pipeline.model
    model_config = {"name": config.name, "num_classes": num_classes, "options": dict(config.options)}
    return build_model(config.name, num_classes, **config.options), model_config


def fit(
    job: StageJob,
    ctx: WorkerContext,
    data: StageData,
    *,
    batches: Iterator[Batch],
    steps_per_epoch: int,
    compute_losses: LossFn,
    model: nn.Module | None = None,
    on_epoch_end: Callable[[int, nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train for ``stage.epochs`` × ``steps_per_epoch`` steps; return the stage summary."""
    stage: TrainingStageConfig = job.stage  # type: ignore[assignment]
    torch.manual_seed(job.seed + job.stage_index)  # same initial weights on every rank
    built, model_config = initial_model(job, data.num_classes)
    network = wrap_for_training(model or built, ctx)
    optimizer = make_optimizer(network, stage.optimizer)
    lr_schedule = make_lr_schedule(optimizer, stage.optimizer, stage.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if ctx.device.type == "cuda" and ctx.precision == "fp16" else None
    val_loader = evaluation_loader(data, data.index.val, job.pipeline.data, ctx)

    best: dict[str, Any] = {"miou": -1.0}
    extra: dict[str, float] = {}
    for epoch in range(1, stage.epochs + 1):
        started = time.perf_counter()
        losses = train_steps(
            network, batches, steps=steps_per_epoch, compute_losses=compute_losses,
            optimizer=optimizer, lr_schedule=lr_schedule, ctx=ctx, scaler=scaler,
        )
        confusion = evaluate(network, val_loader, data.num_classes, ctx)
        miou = confusion.miou()
        extra = on_epoch_end(epoch, network) if on_epoch_end else {}
        metrics = {f"train/{k}" if k == "loss" else f"train/loss_{k}": v for k, v in losses.items()}
        metrics.update({"val/miou": miou, "val/pixel_accuracy": confusion.pixel_accuracy(), **extra})
        ctx.tracker.log_metrics(metrics, step=epoch)
        if miou > best["miou"]:
            best = {"miou": miou, "epoch": epoch, "confusion": confusion.matrix.cpu()}
            if ctx.is_main:
                save_checkpoint(job.output(CHECKPOINT), unwrap(network), model_config, extra={"val_miou": miou, "epoch": epoch})
        ctx.report({"epoch": epoch, **metrics})
        ctx.log(
            f"  [{stage.name}] epoch {epoch}/{stage.epochs}  loss {losses['loss']:.4f}  "
            f"val mIoU {miou:.4f}  ({time.perf_counter() - started:.1f}s)"
        )
    # Online labelling (U2PL) reports pseudo-label quality per epoch; the stage summary keeps the last.
    labelling = {key: value for key, value in extra.items() if key.startswith("pseudo_label/") and key.count("/") == 1}
    return finish_training(job, ctx, data, best, epochs=stage.epochs, extra_summary=labelling)


def finish_training(
    job: StageJob, ctx: WorkerContext, data: StageData, best: dict[str, Any], *, epochs: int,
    extra_summary: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Log the kept checkpoint's val metrics (as the last ``val/miou`` point) and its confusion matrix."""
    confusion = ConfusionMatrix(data.num_classes)
    confusion.matrix = best["confusion"]
    per_class = {f"val/iou/{name}": iou for name, iou in zip(data.class_names, confusion.iou().tolist())}
    final = {"val/miou": best["miou"], "val/best_epoch": best["epoch"], **_finite(per_class)}
    summary = {"val/miou": best["miou"], "val/best_epoch": best["epoch"], "val/iou": per_class, **(extra_summary or {})}
    if ctx.is_main:
        ctx.tracker.log_metrics(final, step=epochs)
        picture = job.output("confusion_matrix.png")
        plot_confusion_matrix(confusion.matrix, data.class_names, picture)
        ctx.tracker.log_artifact(picture)
        job.write_summary(summary)
    return summary


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow stores NaN, but a class never seen is better left out than charted as NaN."""
    return {k: v for k, v in metrics.items() if v == v}


def steps_per_epoch(configured: int | None, dataset_size: int, batch_size: int, world_size: int) -> int:
    """``configured``, or one pass over this worker's shard of the main training set."""
    if configured is not None:
        return configured
    per_worker = -(-dataset_size // world_size)
    return max(1, -(-per_worker // batch_size))
