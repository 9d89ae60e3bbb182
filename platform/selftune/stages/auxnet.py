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

References: ``aux_confidence.model_from`` and ``confidence_label.aux_from`` must be named;
``confidence_label.model_from`` None means the closest earlier training stage.

Training the auxiliary network goes through the shared ``fit`` with its own evaluation (held-out
correctness accuracy and AUC) and a ``KeepBest`` that ranks by ``aux/val_auc``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from selftune.config import AUX_MODEL, MODEL, OptimizerConfig, PseudoLabelStage, Reference, StageConfig, register_stage
from selftune.config.kinds import REQUIRED
from selftune.config.schema import Fraction01
from selftune.data import cycle
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, Hook, TrainState, fit, to_device, unwrap
from selftune.methods.auxnet import (
    AuxiliaryConfidenceNet,
    auxiliary_confidence_loss,
    confident_pseudo_labels,
    correctness_target,
    histogram_auc,
)
from selftune.metrics.confusion import all_reduce_sum_
from selftune.stages.data import StageData, evaluation_loader, prepare_data, training_loader
from selftune.stages.job import CHECKPOINT, StageJob
from selftune.stages.labelling import label_and_measure, load_model
from selftune.stages.training import KeepBest, ReportEpoch, epoch_lines, steps_per_epoch

AUX_WEIGHTS, AUX_CONFIG = "auxnet.pt", "auxnet.json"
AUC_BINS = 1000  # sigmoid scores histogrammed per worker, summed, then the AUC


class AuxConfidenceStage(StageConfig):
    """Train the auxiliary confidence network on a frozen segmentation network's labelled predictions."""

    produces: ClassVar[frozenset[str]] = frozenset({AUX_MODEL})

    kind: Literal["aux_confidence"] = "aux_confidence"
    # The (frozen) segmentation network's training stage; required.
    model_from: Annotated[str, Reference("model", MODEL, when_missing=REQUIRED)]
    epochs: int = Field(50, ge=1)  # paper: 50
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the labelled images
    batch_size: int = Field(4, ge=1)  # paper: 4 (Cityscapes), 8 (CamVid)
    optimizer: OptimizerConfig = OptimizerConfig(name="adam", lr=5e-4, weight_decay=1e-4)  # paper, Cityscapes
    c: float = Field(1.04, gt=1.0)  # class weight 1 / ln(c + p_class)
    gamma_over: Literal["batch", "labelled_set"] = "batch"  # where #neg/#pos is counted (paper silent)
    channels: list[int] = Field([32, 64, 128, 256, 256], min_length=3)  # Table 1
    aspp_channels: int = Field(32, ge=1)
    aspp_dilations: list[int] = Field([1, 2, 4, 8, 16], min_length=1)


class ConfidenceLabelStage(PseudoLabelStage):
    """Argmax labels of ``model_from``, kept where the auxiliary confidence ``>= t_aux``."""

    kind: Literal["confidence_label"] = "confidence_label"  # type: ignore[assignment]
    # The aux_confidence stage; required.
    aux_from: Annotated[str, Reference("aux_model", AUX_MODEL, when_missing=REQUIRED)]
    t_aux: Fraction01 = 0.9  # paper: best 0.9 (Table 3 sweeps 0 ... 0.9)
    unused_threshold: ClassVar[str | None] = "the auxiliary confidence threshold is t_aux"


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
    def compute(aux: torch.nn.Module, batch: Batch, state=None) -> dict[str, torch.Tensor]:
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


class EvaluateAux(Hook):
    """Held-out correctness accuracy and AUC of the auxiliary network after each epoch."""

    def __init__(self, seg: torch.nn.Module, loader, ctx: WorkerContext):
        self.seg, self.loader, self.ctx = seg, loader, ctx

    def after_epoch(self, state: TrainState, model: torch.nn.Module) -> None:
        state.metrics.update(evaluate_aux(self.seg, model, self.loader, self.ctx))


@register_stage(AuxConfidenceStage)
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

    torch.manual_seed(job.init_seed)  # same initial weights on every rank
    architecture = {
        "in_channels": data.num_classes, "channels": list(stage.channels),
        "aspp_channels": stage.aspp_channels, "aspp_dilations": list(stage.aspp_dilations),
    }
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.labelled), stage.batch_size, ctx.world_size)
    batches = cycle(training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed))
    record = {"architecture": architecture, "segmentation_checkpoint": job.inputs["model"], "c": stage.c}
    keep = KeepBest(
        job.output(CHECKPOINT), {}, ctx, metric="aux/val_auc",
        save=lambda folder, net, facts: save_aux(folder, net, {**record, "epoch": facts["epoch"], "val_auc": facts["aux_val_auc"]}),
    )
    # Ranked on the selection images (val under the papers' protocol), never on the reported ones alone.
    hooks = [EvaluateAux(seg, evaluation_loader(data, data.selection, config, ctx), ctx), keep,
             ReportEpoch(ctx), *epoch_lines(ctx, stage.name, shown="aux/val_auc")]
    fit(AuxiliaryConfidenceNet(**architecture), batches, epochs=stage.epochs, steps_per_epoch=steps,
        compute_losses=aux_loss_terms(seg, ctx, frequency, stage.c, gamma), optimizer=stage.optimizer, ctx=ctx, hooks=hooks)
    best = {k: v for k, v in keep.best_metrics.items() if k.startswith("aux/")}
    best["aux/best_epoch"] = keep.best_epoch
    if ctx.is_main:
        ctx.tracker.log_metrics({k: v for k, v in best.items() if v == v}, step=stage.epochs)
    return best


# --------------------------------------------------------------------------------------------
# Stage 3: keep the pixels the auxiliary network trusts
# --------------------------------------------------------------------------------------------


@register_stage(ConfidenceLabelStage)
def run_confidence_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: ConfidenceLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    seg = load_model(job.inputs["model"], ctx)
    aux, record = load_aux(job.inputs["aux_model"], ctx.device)
    if Path(record["segmentation_checkpoint"]).resolve() != Path(job.inputs["model"]).resolve():
        ctx.log(f"  [{stage.name}] note: the auxiliary network was trained on {record['segmentation_checkpoint']}, "
                f"labelling with {job.inputs['model']}")

    def labeller(model: torch.nn.Module, batch) -> torch.Tensor:
        probs = _frozen_probs(model, batch["image"], ctx)  # (B, C, H, W)
        with torch.no_grad():
            confidence = torch.sigmoid(aux(probs).float())  # (B, 1, H, W)
        return confident_pseudo_labels(probs.argmax(1), confidence, stage.t_aux)

    return label_and_measure(job, ctx, data, seg, labeller, extra_metrics={"aux/t_aux": stage.t_aux})
