"""Test-time-augmented pseudo-labelling, shared by ST++ and Yuan et al. (SAUG + DSBN + SCL).

Both papers label the unlabelled images with multi-scale + flip inference: the softmax of every
(scale, flip) view, resized back to the image, is summed and the argmax taken (ST++'s ``label()``
uses scales 0.5, 0.75, 1, 1.5, 2; Yuan et al. Sec. 4.2 use 0.5, 0.75, 1.0, 1.5, 1.75 and flip).

Stage kind ``tta_label``: like ``pseudo_label`` (same ``model_from`` / ``threshold`` keys, same
default: the closest earlier training stage), plus ``scales`` and ``flip``. The helpers
``tta_probabilities`` and ``label_samples`` are reused by the ST++ stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from selftune.config import PseudoLabelStage
from selftune.config.schema import register_stage_config
import albumentations as A
from torch.utils.data import DataLoader

from selftune.data import Sample, SegmentationDataset, make_loader
from selftune.engine.context import WorkerContext
from selftune.engine.loop import to_device
from selftune.metrics import PseudoLabelQuality
from selftune.models import load_checkpoint
from selftune.stages.data import StageData, evaluation_loader, prepare_data
from selftune.stages.job import PSEUDO_LABELS, StageJob, register_stage
from selftune.stages.pseudo_label import _loggable, label, log_overlays, quality_summary, write_label_png

YUAN_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75)


@register_stage_config
class TtaLabelStage(PseudoLabelStage):
    """A trained model labels the unlabelled images with multi-scale + flip inference."""

    kind: Literal["tta_label"] = "tta_label"  # type: ignore[assignment]
    scales: list[float] = Field(default_factory=lambda: list(YUAN_SCALES), min_length=1)  # [1.0] + flip false = plain argmax
    flip: bool = True  # add the horizontally flipped view of every scale

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError("every scale must be > 0")
        return value


@torch.no_grad()
def tta_probabilities(
    model: nn.Module, images: torch.Tensor, ctx: WorkerContext, *, scales: Sequence[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Summed softmax over the views: (B, 3, H, W) -> (B, C, H, W) float32, not normalised.

    Each view is the batch resized by ``scale`` (bilinear, ``align_corners=True`` as ST++), and
    optionally flipped; its softmax is flipped back and resized to (H, W) before summing. The sum
    (not the mean) is what both authors argmax; divide by the number of views for a probability.
    """
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        view = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear", align_corners=True)
        for flipped in (False, True) if flip else (False,):
            with ctx.autocast():
                logits = model(view.flip(-1) if flipped else view)
            probs = F.softmax(logits.float(), dim=1)  # (B, C, h, w)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=True)
            total = probs if total is None else total + probs
    assert total is not None
    return total


def tta_labels(probs_sum: torch.Tensor, views: int, threshold: float | None) -> torch.Tensor:
    """Argmax of the summed softmax; with ``threshold``, pixels whose mean probability is below it are 255."""
    return label(probs_sum / views, threshold)


def view_count(scales: Sequence[float], flip: bool) -> int:
    return len(scales) * (2 if flip else 1)


@torch.no_grad()
def label_samples(
    model: nn.Module, samples: Sequence[Sample], data: StageData, job: StageJob, ctx: WorkerContext, out: Path,
    *, scales: Sequence[float], flip: bool, threshold: float | None = None,
) -> PseudoLabelQuality | None:
    """Write ``out/<id>.png`` for this worker's shard of ``samples`` with TTA labels; return the
    quality against ground truth summed over all workers (None when the images have no ground truth).
    Every rank must call it (the quality is all-reduced)."""
    model = model.to(ctx.device).eval()
    has_truth = all(sample.mask is not None for sample in samples)
    loader = evaluation_loader(data, samples, job.pipeline.data, ctx, masks="ground_truth" if has_truth else "none")
    quality = PseudoLabelQuality(data.num_classes)
    views = view_count(scales, flip)
    for batch in loader:
        batch = to_device(batch, ctx.device)
        labels = tta_labels(tta_probabilities(model, batch["image"], ctx, scales=scales, flip=flip), views, threshold)
        for sample_id, sample_labels, (height, width) in zip(batch["id"], labels.cpu().numpy(), batch["size"].tolist()):
            write_label_png(out / f"{sample_id}.png", sample_labels[:height, :width])  # drop the batch padding
        if has_truth:
            quality.update(labels, batch["mask"])
    quality.all_reduce()
    return quality if has_truth else None


def log_quality(ctx: WorkerContext, summary: dict[str, Any], step: int, prefix: str = "") -> None:
    """Log a ``quality_summary`` (flattened) at ``step``; ``prefix`` renames ``pseudo_label/`` keys."""
    flat = _loggable(summary)
    if prefix:
        flat = {k.replace("pseudo_label/", prefix, 1): v for k, v in flat.items()}
    ctx.tracker.log_metrics(flat, step=step)


def describe(name: str, what: str, summary: dict[str, Any], count: int) -> str:
    if not summary:
        return f"  [{name}] {what}: labelled {count} images (no ground truth to measure quality)"
    return (
        f"  [{name}] {what}: labelled {count} images  pseudo-label mIoU {summary['pseudo_label/miou']:.4f}  "
        f"kept {100 * summary['pseudo_label/kept_fraction']:.1f}%"
    )


def augmented_loader(
    data: StageData, samples: Sequence[Sample], job: StageJob, ctx: WorkerContext, *, batch_size: int, seed: int,
    masks: str | Path, transform: A.Compose, strong_transform: A.Compose | None = None,
) -> DataLoader:
    """``stages.data.training_loader`` with a caller-chosen transform (and optional image-only
    ``strong_transform``, giving ``batch["image_strong"]``): both methods train on strongly
    augmented pseudo-labelled images, which the shared loader does not build."""
    dataset = SegmentationDataset(
        samples, num_classes=data.num_classes, masks=masks, label_map=data.index.label_map,
        transform=transform, strong_transform=strong_transform,
    )
    return make_loader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=job.pipeline.data.loader_workers,
        rank=ctx.rank, world_size=ctx.world_size, seed=seed, drop_last=len(dataset) >= batch_size * ctx.world_size,
    )


@register_stage("tta_label")
def run_tta_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: TtaLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    model, _ = load_checkpoint(Path(job.inputs["model"]))
    out = job.output(PSEUDO_LABELS)
    quality = label_samples(
        model, data.unlabelled, data, job, ctx, out, scales=stage.scales, flip=stage.flip, threshold=stage.threshold,
    )
    ctx.report({"labelled": len(data.unlabelled)})  # a barrier: every worker's PNGs are written
    summary = quality_summary(quality, data) if quality is not None else {}
    if ctx.is_main:
        log_quality(ctx, summary, step=stage.round or 0)
        log_overlays(job, ctx, data, out)
        job.write_summary(summary)
    ctx.log(describe(stage.name, "TTA", summary, len(data.unlabelled)))
    return summary
