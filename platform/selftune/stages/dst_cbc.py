"""``class_balanced_label``: DST-CBC's class-balanced curriculum pseudo labels (Feng et al., Alg. 1).

A trained model labels the unlabelled images in two passes:

1. Thresholds. Every ``sample_every``-th pixel's (max softmax, argmax) is collected over the whole
   unlabelled set (all workers), and each class gets the threshold that keeps its top ``alpha``
   fraction (``methods.dst_cbc.class_balanced_thresholds``; authors: every 16th pixel).
2. Labels. ``argmax p`` where ``max p >= t_argmax`` (and ``max p > T`` if a global ``T`` is set),
   else 255 (``methods.dst_cbc.class_balanced_pseudo_labels``: the authors' successor rule, DMT;
   the original DST-CBC ``argmax p_c / t_c`` can pick a non-argmax class, which its author called
   wrong). One PNG per image; quality against the unlabelled ground truth as in ``pseudo_label``.

The curriculum (alpha = 0.2 … 1.0 over rounds) is a ``kind: rounds`` group with a schedule on
``alpha``; the following ``self_train`` (``init_from: previous``, ``gamma``) is a new stage each
round, so its optimizer and LR schedule restart, as in the authors' code. The images are labelled
at their own resolution (the authors resize VOC to 321×321 first).

References: ``model_from`` None means the closest earlier training stage (resolved by the loader,
as for ``pseudo_label``, because this kind subclasses ``PseudoLabelStage``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator

from selftune.config import PseudoLabelStage, register_stage_config
from selftune.config.schema import Fraction01
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, predict, to_device
from selftune.methods.dst_cbc import class_balanced_pseudo_labels, class_balanced_thresholds
from selftune.metrics import PseudoLabelQuality
from selftune.models import load_checkpoint
from selftune.stages.data import StageData, evaluation_loader, prepare_data
from selftune.stages.job import PSEUDO_LABELS, StageJob, register_stage
from selftune.stages.pseudo_label import _describe, _loggable, log_overlays, quality_summary, write_label_png

# (batch on the device, its probabilities (B, C, H, W)) -> labels (B, H, W), 255 = not kept
Labeller = Callable[[Batch, torch.Tensor], torch.Tensor]


@register_stage_config
class ClassBalancedLabelStage(PseudoLabelStage):
    """Keep the top ``alpha`` of each predicted class (eq. 6); optional global threshold ``T``."""

    kind: Literal["class_balanced_label"] = "class_balanced_label"  # type: ignore[assignment]
    alpha: Fraction01 = 0.2  # fraction kept per class; scheduled over rounds (0.2 -> 1.0)
    T: Fraction01 | None = None  # eq. 6 global threshold, max p > T; None: off (the paper's main setting)
    sample_every: int = Field(16, ge=1)  # threshold estimated on every n-th pixel (authors: 16 = 6.25 %)

    @field_validator("threshold")
    @classmethod
    def _no_threshold(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("is not used by class_balanced_label; use T for a global confidence threshold")
        return value


# --------------------------------------------------------------------------------------------
# Shared labelling pass (also used by the auxiliary-network stage)
# --------------------------------------------------------------------------------------------


def unlabelled_loader(job: StageJob, ctx: WorkerContext, data: StageData):
    """This worker's shard of the unlabelled images, with ground truth where the dataset has it."""
    has_truth = all(sample.mask is not None for sample in data.unlabelled)
    loader = evaluation_loader(data, data.unlabelled, job.pipeline.data, ctx, masks="ground_truth" if has_truth else "none")
    return loader, has_truth


def load_model(path: str, ctx: WorkerContext) -> torch.nn.Module:
    model, _ = load_checkpoint(Path(path))
    return model.to(ctx.device).eval()


def label_unlabelled(
    job: StageJob, ctx: WorkerContext, data: StageData, model: torch.nn.Module, labeller: Labeller,
    *, extra_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Label every unlabelled image with ``labeller``, write the PNGs, measure and log quality.

    Metrics go to the stage run with the round as step (0 outside a ``rounds`` group). Returns the
    summary (pseudo-label quality + ``extra_metrics``), written to ``summary.json`` by rank 0.
    """
    loader, has_truth = unlabelled_loader(job, ctx, data)
    out = job.output(PSEUDO_LABELS)
    quality = PseudoLabelQuality(data.num_classes)
    for batch in loader:
        batch = to_device(batch, ctx.device)
        labels = labeller(batch, predict(model, batch["image"], ctx))  # (B, H, W)
        for sample_id, sample_labels, (height, width) in zip(batch["id"], labels.cpu().numpy(), batch["size"].tolist()):
            write_label_png(out / f"{sample_id}.png", sample_labels[:height, :width])  # drop the batch padding
        if has_truth:
            quality.update(labels, batch["mask"])
    quality.all_reduce()
    ctx.report({"labelled": len(data.unlabelled)})  # a barrier: every worker's PNGs are written
    summary = {**(quality_summary(quality, data) if has_truth else {}), **(extra_metrics or {})}
    if ctx.is_main:
        ctx.tracker.log_metrics(_loggable(summary), step=job.stage.round or 0)
        log_overlays(job, ctx, data, out)
        job.write_summary(summary)
    ctx.log(_describe(job.stage.name, summary, len(data.unlabelled)))
    return summary


# --------------------------------------------------------------------------------------------
# Pass 1: sampled confidences -> thresholds
# --------------------------------------------------------------------------------------------


def sampled_confidences(
    model: torch.nn.Module, loader, ctx: WorkerContext, num_classes: int, sample_every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``sample_every``-th (max p, argmax) of this worker's images, padding excluded.

    Pixels are taken in memory order over each batch's images, as the authors flatten their batch.
    Returns (M,) float32 confidences and (M,) class ids (uint8 when the classes fit).
    """
    class_dtype = torch.uint8 if num_classes <= 256 else torch.int32
    confidences, classes = [], []
    for batch in loader:
        batch = to_device(batch, ctx.device)
        confidence, prediction = predict(model, batch["image"], ctx).max(dim=1)  # (B, H, W) each
        sizes = batch["size"].tolist()
        conf = torch.cat([c[:h, :w].reshape(-1) for c, (h, w) in zip(confidence, sizes)])[::sample_every]
        pred = torch.cat([p[:h, :w].reshape(-1) for p, (h, w) in zip(prediction, sizes)])[::sample_every]
        confidences.append(conf.float())
        classes.append(pred.to(class_dtype))
    empty = torch.empty(0, device=ctx.device)
    return (
        torch.cat(confidences) if confidences else empty.float(),
        torch.cat(classes) if classes else empty.to(class_dtype),
    )


def gather_concat(values: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    """Concatenate a 1-D tensor of varying length over all workers (identity without DDP)."""
    if not ctx.distributed:
        return values
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, lengths)])


def global_thresholds(
    model: torch.nn.Module, job: StageJob, ctx: WorkerContext, data: StageData, stage: ClassBalancedLabelStage
) -> torch.Tensor:
    """(C,) class-balanced thresholds over the whole unlabelled set, identical on every worker."""
    loader, _ = unlabelled_loader(job, ctx, data)
    conf, pred = sampled_confidences(model, loader, ctx, data.num_classes, stage.sample_every)
    conf, pred = gather_concat(conf, ctx), gather_concat(pred, ctx)
    # Already sampled, so sample_every=1 here.
    return class_balanced_thresholds(conf, pred.long(), data.num_classes, stage.alpha, sample_every=1)


def threshold_metrics(thresholds: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """``class_balanced/threshold/<class>``; classes never predicted (+inf) or alpha = 1 (-inf) left out."""
    return {
        f"class_balanced/threshold/{name}": value
        for name, value in zip(class_names, thresholds.tolist())
        if math.isfinite(value)
    }


@register_stage("class_balanced_label")
def run_class_balanced_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: ClassBalancedLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    model = load_model(job.inputs["model"], ctx)
    thresholds = global_thresholds(model, job, ctx, data, stage)

    def labeller(batch: Batch, probs: torch.Tensor) -> torch.Tensor:
        return class_balanced_pseudo_labels(probs, thresholds, stage.T)

    extra = {"class_balanced/alpha": stage.alpha, **threshold_metrics(thresholds, data.class_names)}
    return label_unlabelled(job, ctx, data, model, labeller, extra_metrics=extra)
