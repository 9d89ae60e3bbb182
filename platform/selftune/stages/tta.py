"""Test-time-augmented pseudo-labelling, shared by ST++ and Yuan et al. (SAUG + DSBN + SCL).

Both papers label the unlabelled images with multi-scale + flip inference: the softmax of every
(scale, flip) view, resized back to the image, is summed and the argmax taken (ST++'s ``label()``
uses scales 0.5, 0.75, 1, 1.5, 2; Yuan et al. Sec. 4.2 use 0.5, 0.75, 1.0, 1.5, 1.75 and flip).

Stage kind ``tta_label``: like ``pseudo_label`` (same ``model_from`` / ``threshold`` keys, same
default: the closest earlier training stage), plus ``scales`` and ``flip``. ``tta_labeller`` is
reused by the ST++ stages.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from selftune.config import PseudoLabelStage, register_stage
from selftune.engine.context import WorkerContext
from selftune.stages.data import prepare_data
from selftune.stages.job import StageJob
from selftune.stages.labelling import Labeller, label_and_measure, load_model, threshold_labels

YUAN_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75)


class TtaLabelStage(PseudoLabelStage):
    """A trained model labels the unlabelled images with multi-scale + flip inference."""

    kind: Literal["tta_label"] = "tta_label"  # type: ignore[assignment]
    scales: list[float] = Field(default_factory=lambda: list(YUAN_SCALES), min_length=1)  # [1.0] + flip false = plain argmax
    flip: bool = True  # add the horizontally flipped view of every scale

    @field_validator("scales", mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """``"0.75,1.0,1.25"`` is ``[0.75, 1.0, 1.25]``: a search space can choose among scale sets
        (Optuna's categorical choices are scalars, not lists)."""
        if isinstance(value, str):
            try:
                return [float(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError("must be a list of scales or a comma-separated text such as '0.75,1.0,1.25'") from None
        return value

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
    return threshold_labels(probs_sum / views, threshold)


def view_count(scales: Sequence[float], flip: bool) -> int:
    return len(scales) * (2 if flip else 1)


def tta_labeller(ctx: WorkerContext, scales: Sequence[float], flip: bool, threshold: float | None) -> Labeller:
    """Labels from the summed softmax of every (scale, flip) view; ``threshold`` on the mean."""
    views = view_count(scales, flip)

    def labeller(model: nn.Module, batch) -> torch.Tensor:
        return tta_labels(tta_probabilities(model, batch["image"], ctx, scales=scales, flip=flip), views, threshold)

    return labeller


@register_stage(TtaLabelStage)
def run_tta_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: TtaLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    labeller = tta_labeller(ctx, stage.scales, stage.flip, stage.threshold)
    return label_and_measure(job, ctx, data, load_model(job.inputs["model"], ctx), labeller, what="TTA")
