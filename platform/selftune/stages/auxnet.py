"""Auxiliary confidence network (seed 004, Sec. 3.1): two stage kinds.

``aux_confidence`` (stage 2): the segmentation network of ``model_from`` is frozen; a small CNN
(``methods.auxnet.AuxiliaryConfidenceNet``, Table 1) learns from its softmax map of the
*labelled* images whether each pixel's prediction is correct, with the weighted BCE of eq. 1
(``auxiliary_confidence_loss``: class weight ``1 / ln(c + p_class)``, positive weight
#neg/#pos per class). Each epoch it is scored on val (held out from both networks): correctness
accuracy at 0.5 and ROC AUC; the best-AUC weights go to ``checkpoint/auxnet.pt`` + ``auxnet.json``.

``confidence_label`` (stage 3): the segmentation network labels the unlabelled images (argmax),
and pixels whose auxiliary confidence is below ``t_aux`` become 255. Quality is logged as for
every labelling stage.

References: ``aux_confidence.model_from`` and ``confidence_label.aux_from`` must be given
explicitly (the loader resolves only built-in reference fields); ``confidence_label.model_from``
None means the closest earlier training stage (resolved by the loader, as for ``pseudo_label``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from selftune.config import OptimizerConfig, PseudoLabelStage, StageConfig, register_stage_config
from selftune.config.schema import Fraction01
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, cycle, make_lr_schedule, make_optimizer, to_device, train_steps, unwrap, wrap_for_training
from selftune.methods.auxnet import (
    AuxiliaryConfidenceNet,
    auxiliary_confidence_loss,
    confident_pseudo_labels,
    correctness_target,
    histogram_auc,
)
from selftune.metrics.confusion import all_reduce_sum_
from selftune.stages.data import StageData, evaluation_loader, prepare_data, training_loader
from selftune.stages.dst_cbc import label_unlabelled, load_model
from selftune.stages.job import CHECKPOINT, StageJob, register_stage
from selftune.stages.training import steps_per_epoch

AUX_WEIGHTS, AUX_CONFIG = "auxnet.pt", "auxnet.json"
AUC_BINS = 1000  # sigmoid scores histogrammed per worker, summed, then the AUC


@register_stage_config
class AuxConfidenceStage(StageConfig):
    """Train the auxiliary confidence network on a frozen segmentation network's labelled predictions."""

    reference_fields: ClassVar[tuple[str, ...]] = ("model_from",)

    kind: Literal["aux_confidence"] = "aux_confidence"
    model_from: str  # the (frozen) segmentation network's training stage; required
    epochs: int = Field(50, ge=1)  # paper: 50
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the labelled images
    batch_size: int = Field(4, ge=1)  # paper: 4 (Cityscapes), 8 (CamVid)
    optimizer: OptimizerConfig = OptimizerConfig(name="adam", lr=5e-4, weight_decay=1e-4)  # paper, Cityscapes
    c: float = Field(1.04, gt=1.0)  # class weight 1 / ln(c + p_class)
    gamma_over: Literal["batch", "labelled_set"] = "batch"  # where #neg/#pos is counted (paper silent)
    channels: list[int] = Field([32, 64, 128, 256, 256], min_length=3)  # Table 1
    aspp_channels: int = Field(32, ge=1)
    aspp_dilations: list[int] = Field([1, 2, 4, 8, 16], min_length=1)

    def upstream(self) -> dict[str, str]:
        return {"model": self.model_from}


@register_stage_config
class ConfidenceLabelStage(PseudoLabelStage):
    """Argmax labels of ``model_from``, kept where the auxiliary confidence ``>= t_aux``."""

    reference_fields: ClassVar[tuple[str, ...]] = ("model_from", "aux_from")

    kind: Literal["confidence_label"] = "confidence_label"  # type: ignore[assignment]
    aux_from: str  # the aux_confidence stage; required
    t_aux: Fraction01 = 0.9  # paper: best 0.9 (Table 3 sweeps 0 ... 0.9)

    @field_validator("threshold")
    @classmethod
    def _no_threshold(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("is not used by confidence_label; the auxiliary confidence threshold is t_aux")
        return value

    def upstream(self) -> dict[str, str]:
        return {**super().upstream(), "aux_model": self.aux_from}


# --------------------------------------------------------------------------------------------
# Checkpoint of the auxiliary network (not a SegmentationNetwork, so its own small format)
# --------------------------------------------------------------------------------------------


def save_aux(directory: Path, net: torch.nn.Module, config: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()}, directory / AUX_WEIGHTS)
    (directory / AUX_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_aux(directory: str | Path, device: torch.device) -> tuple[AuxiliaryConfidenceNet, dict[str, Any]]:
    directory = Path(directory)
    config = json.loads((directory / AUX_CONFIG).read_text())
    net = AuxiliaryConfidenceNet(**config["architecture"])
    net.load_state_dict(torch.load(directory / AUX_WEIGHTS, map_location="cpu", weights_only=True))
    return net.to(device).eval(), config


# --------------------------------------------------------------------------------------------
# Stage 2: train the auxiliary network
# --------------------------------------------------------------------------------------------


def _frozen_probs(seg: torch.nn.Module, images: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    with torch.no_grad(), ctx.autocast():
        return F.softmax(seg(images).float(), dim=1)  # (B, C, H, W)


def labelled_statistics(
    seg: torch.nn.Module, job: StageJob, ctx: WorkerContext, data: StageData
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the labelled set (summed over workers): p_class (C,), and per class the correct and
    total pixel counts of the frozen network (for ``gamma_over: labelled_set``)."""
    c = data.num_classes
    counts = torch.zeros(c, dtype=torch.int64, device=ctx.device)
    correct = torch.zeros(c, dtype=torch.int64, device=ctx.device)
    for batch in evaluation_loader(data, data.labelled, job.pipeline.data, ctx):
        batch = to_device(batch, ctx.device)
        mask = batch["mask"]
        valid = mask != 255
        right = correctness_target(_frozen_probs(seg, batch["image"], ctx).argmax(1), mask) & valid
        counts += torch.bincount(mask[valid], minlength=c)[:c]
        correct += torch.bincount(mask[right], minlength=c)[:c]
    all_reduce_sum_(counts)
    all_reduce_sum_(correct)
    return counts.double() / counts.sum().clamp(min=1), correct, counts


def aux_loss_terms(seg: torch.nn.Module, ctx: WorkerContext, frequency: torch.Tensor, c: float, gamma: torch.Tensor | None):
    def compute(aux: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        probs = _frozen_probs(seg, batch["image"], ctx)  # (B, C, H, W), no gradient into seg
        correct = correctness_target(probs.argmax(1), batch["mask"])  # (B, H, W) y of eq. 1
        logits = aux(probs)  # (B, 1, H, W)
        return {"aux": auxiliary_confidence_loss(logits, correct, batch["mask"], frequency, c, gamma=gamma)}

    return compute


@torch.no_grad()
def evaluate_aux(seg, aux, loader, ctx: WorkerContext) -> dict[str, float]:
    """Held-out correctness prediction: accuracy at 0.5, ROC AUC, share of correct pixels."""
    aux.eval()
    positive = torch.zeros(AUC_BINS, dtype=torch.int64, device=ctx.device)
    negative = torch.zeros_like(positive)
    hits = torch.zeros(2, dtype=torch.int64, device=ctx.device)  # [right calls, pixels]
    for batch in loader:
        batch = to_device(batch, ctx.device)
        probs = _frozen_probs(seg, batch["image"], ctx)
        valid = batch["mask"] != 255
        y = correctness_target(probs.argmax(1), batch["mask"])[valid]
        score = torch.sigmoid(aux(probs).float())[:, 0][valid]
        bins = (score * AUC_BINS).long().clamp(max=AUC_BINS - 1)
        positive += torch.bincount(bins[y], minlength=AUC_BINS)
        negative += torch.bincount(bins[~y], minlength=AUC_BINS)
        hits += torch.stack([((score >= 0.5) == y).sum(), y.new_tensor(y.numel(), dtype=torch.int64)])
    for tensor in (positive, negative, hits):
        all_reduce_sum_(tensor)
    pixels = max(int(hits[1]), 1)
    return {
        "aux/val_accuracy": int(hits[0]) / pixels,
        "aux/val_auc": histogram_auc(positive, negative),
        "aux/val_correct_fraction": int(positive.sum()) / pixels,
    }


@register_stage("aux_confidence")
def run_aux_confidence(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: AuxConfidenceStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    seg = load_model(job.inputs["model"], ctx)
    for parameter in seg.parameters():
        parameter.requires_grad_(False)
    frequency, correct, counts = labelled_statistics(seg, job, ctx, data)
    gamma = None  # eq. 1's #neg/#pos from each batch ...
    if stage.gamma_over == "labelled_set":  # ... or from the whole labelled set
        gamma = torch.where(correct > 0, (counts - correct).double() / correct.clamp(min=1), torch.zeros_like(frequency))

    torch.manual_seed(job.seed + job.stage_index)  # same initial weights on every rank
    architecture = {
        "in_channels": data.num_classes, "channels": list(stage.channels),
        "aspp_channels": stage.aspp_channels, "aspp_dilations": list(stage.aspp_dilations),
    }
    aux = wrap_for_training(AuxiliaryConfidenceNet(**architecture), ctx)
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.labelled), stage.batch_size, ctx.world_size)
    optimizer = make_optimizer(aux, stage.optimizer)
    lr_schedule = make_lr_schedule(optimizer, stage.optimizer, stage.epochs * steps)
    batches = cycle(training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed))
    val_loader = evaluation_loader(data, data.index.val, config, ctx)
    compute = aux_loss_terms(seg, ctx, frequency, stage.c, gamma)

    best: dict[str, Any] = {}
    best_score = -float("inf")
    record = {"architecture": architecture, "segmentation_checkpoint": job.inputs["model"], "c": stage.c}
    for epoch in range(1, stage.epochs + 1):
        started = time.perf_counter()
        losses = train_steps(aux, batches, steps=steps, compute_losses=compute, optimizer=optimizer,
                             lr_schedule=lr_schedule, ctx=ctx)
        metrics = {"aux/train_loss": losses["loss"], **evaluate_aux(seg, aux, val_loader, ctx)}
        ctx.tracker.log_metrics(metrics, step=epoch)
        auc = metrics["aux/val_auc"]
        score = auc if auc == auc else -1.0  # NaN (val holds one class only) ranks below any AUC
        if not best or score > best_score:
            best, best_score = {**metrics, "aux/best_epoch": epoch}, score
            if ctx.is_main:
                save_aux(job.output(CHECKPOINT), aux, {**record, "epoch": epoch, "val_auc": auc})
        ctx.report({"epoch": epoch, **metrics})
        ctx.log(f"  [{stage.name}] epoch {epoch}/{stage.epochs}  loss {losses['loss']:.4f}  "
                f"val correctness acc {metrics['aux/val_accuracy']:.4f}  AUC {auc:.4f}  ({time.perf_counter() - started:.1f}s)")
    if ctx.is_main:
        ctx.tracker.log_metrics({k: v for k, v in best.items() if v == v}, step=stage.epochs)
        job.write_summary(best)
    return best


# --------------------------------------------------------------------------------------------
# Stage 3: keep the pixels the auxiliary network trusts
# --------------------------------------------------------------------------------------------


@register_stage("confidence_label")
def run_confidence_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: ConfidenceLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    seg = load_model(job.inputs["model"], ctx)
    aux, record = load_aux(job.inputs["aux_model"], ctx.device)
    if Path(record["segmentation_checkpoint"]).resolve() != Path(job.inputs["model"]).resolve():
        ctx.log(f"  [{stage.name}] note: the auxiliary network was trained on {record['segmentation_checkpoint']}, "
                f"labelling with {job.inputs['model']}")

    def labeller(batch: Batch, probs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            confidence = torch.sigmoid(aux(probs).float())  # (B, 1, H, W)
        return confident_pseudo_labels(probs.argmax(1), confidence, stage.t_aux)

    return label_unlabelled(job, ctx, data, seg, labeller, extra_metrics={"aux/t_aux": stage.t_aux})
