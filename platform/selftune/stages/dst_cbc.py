"""DST-CBC (Feng et al., seed 001): class-balanced curriculum labels and the dynamic self-training loss.

``class_balanced_label`` labels the unlabelled images in two passes:

1. Thresholds. Every ``sample_every``-th pixel of each image (max softmax, argmax) is collected
   over the whole unlabelled set (all workers) in compact arrays, and each class gets the
   threshold that keeps its top ``alpha`` fraction (``methods.dst_cbc``; authors: every 16th
   pixel; a class with n·alpha < 1 keeps everything, as DMT does).
2. Labels. ``argmax p`` where ``max p >= t_argmax`` (and ``max p > T`` if a global ``T`` is set),
   else 255 (``methods.dst_cbc.class_balanced_pseudo_labels``: the authors' successor rule, DMT;
   the original DST-CBC ``argmax p_c / t_c`` can pick a non-argmax class, which its author called
   wrong). One PNG per image; quality against the unlabelled ground truth (``stages.labelling``).

``dst_train`` is self-training with DST-CBC's dynamic loss (eqs. 1-2, ``gamma``), normalised as
the authors do for every gamma: one shared denominator, the non-ignored pixels of the whole
labelled + pseudo-labelled batch (``methods.dst_cbc.dynamic_self_training_terms``; gamma = 0 is
then plain CE over that denominator, continuous with gamma -> 0+).

The curriculum (alpha = 0.2 … 1.0 over rounds) is a ``kind: rounds`` group with a schedule on
``alpha``; the following ``dst_train`` (``init_from: previous``) is a new stage each round, so its
optimizer and LR schedule restart, as in the authors' code. The images are labelled at their own
resolution (the authors resize VOC to 321×321 first).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from pydantic import Field

from selftune.config import PseudoLabelledTraining, PseudoLabelStage, register_stage
from selftune.config.schema import Fraction01
from selftune.engine.context import WorkerContext
from selftune.engine.loop import predict, to_device
from selftune.methods.dst_cbc import (
    class_balanced_pseudo_labels, class_balanced_thresholds_from_sample, dynamic_self_training_terms, sample_confidences,
    valid_pixels,
)
from selftune.stages.data import StageData, evaluation_loader, prepare_data
from selftune.stages.job import StageJob
from selftune.stages.labelling import label_and_measure, load_model
from selftune.stages.self_train import train_on_pseudo_labels


class ClassBalancedLabelStage(PseudoLabelStage):
    """Keep the top ``alpha`` of each predicted class (eq. 6); optional global threshold ``T``."""

    kind: Literal["class_balanced_label"] = "class_balanced_label"  # type: ignore[assignment]
    alpha: Fraction01 = 0.2  # fraction kept per class; scheduled over rounds (0.2 -> 1.0)
    T: Fraction01 | None = None  # eq. 6 global threshold, max p > T; None: off (the paper's main setting)
    sample_every: int = Field(16, ge=1)  # threshold estimated on every n-th pixel (authors: 16 = 6.25 %)
    unused_threshold: ClassVar[str | None] = "use T for a global confidence threshold"


class DstTrainStage(PseudoLabelledTraining):
    """Self-training with the dynamic loss: pseudo-labelled pixels weigh ``p_cur[label]^gamma``."""

    kind: Literal["dst_train"] = "dst_train"  # type: ignore[assignment]
    gamma: float = Field(9.0, ge=0)  # table 1: 0 ... 12, best 9 (4 with > 1000 labels); all shipped scripts: 9


# --------------------------------------------------------------------------------------------
# Pass 1: sampled confidences -> thresholds
# --------------------------------------------------------------------------------------------


def sampled_confidences(
    model: torch.nn.Module, loader, ctx: WorkerContext, sample_every: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every ``sample_every``-th valid pixel of each of this worker's images, per image as the
    authors' successor code samples (``methods.dst_cbc.sample_confidences``): per batch, compact
    copies of (max p) float32 and (argmax) uint8, never a view of the full-resolution map."""
    confidences, classes = [], []
    for batch in loader:
        batch = to_device(batch, ctx.device)
        probs = predict(model, batch["image"], ctx)  # (B, C, H, W)
        conf, cls = sample_confidences(probs, valid_pixels(batch["size"], *probs.shape[2:]), sample_every)
        confidences.append(conf)
        classes.append(cls)
    return confidences, classes


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
    # Masks are not needed here; the pass reads each image once (no decode cache: memory stays flat).
    loader = evaluation_loader(data, data.unlabelled, job.pipeline.data, ctx, masks="none", one_pass=True)
    conf, pred = sampled_confidences(model, loader, ctx, stage.sample_every)
    if ctx.distributed:  # every worker needs the whole set's thresholds: world_size x the sample
        conf, pred = [gather_concat(_cat(conf), ctx)], [gather_concat(_cat(pred), ctx)]
    # A class with n·alpha < 1 keeps all its pixels, as the authors' successor code (DMT) does.
    return class_balanced_thresholds_from_sample(conf, pred, data.num_classes, stage.alpha, keep_small_classes=True)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.empty(0)


def threshold_metrics(thresholds: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """``class_balanced/threshold/<class>``; classes never predicted (+inf) or alpha = 1 (-inf) left out."""
    return {
        f"class_balanced/threshold/{name}": value
        for name, value in zip(class_names, thresholds.tolist())
        if math.isfinite(value)
    }


@register_stage(ClassBalancedLabelStage)
def run_class_balanced_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: ClassBalancedLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    model = load_model(job.inputs["model"], ctx)
    thresholds = global_thresholds(model, job, ctx, data, stage)

    def labeller(model, batch) -> torch.Tensor:
        return class_balanced_pseudo_labels(predict(model, batch["image"], ctx), thresholds, stage.T)

    extra = {"class_balanced/alpha": stage.alpha, **threshold_metrics(thresholds, data.class_names)}
    return label_and_measure(job, ctx, data, model, labeller, extra_metrics=extra)


# --------------------------------------------------------------------------------------------
# dst_train: the dynamic self-training loss
# --------------------------------------------------------------------------------------------


def dst_terms(pseudo_weight: float, gamma: float):
    """``compute_losses`` of eqs. 1-2 on a two-stream batch (one forward over labelled + pseudo-labelled)."""

    def compute(model, batch, state=None) -> dict[str, torch.Tensor]:
        logits = model(batch.joint("image"))  # (B_l + B_u, C, H, W)
        seg, pseudo = dynamic_self_training_terms(logits, batch.joint("mask"), batch.n_labelled, gamma)
        return {"seg": seg, "pseudo": pseudo_weight * pseudo}

    return compute


@register_stage(DstTrainStage)
def run_dst_train(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: DstTrainStage = job.stage  # type: ignore[assignment]
    return train_on_pseudo_labels(job, ctx, lambda data: dst_terms(stage.pseudo_weight, stage.gamma))
