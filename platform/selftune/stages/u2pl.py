"""``u2pl``: online U2PL training (Wang et al., seed 002, first part: "Using Unreliable Pseudo-Labels").

One stage trains a mean teacher (``stages.teacher.MeanTeacher``; EMA of the parameters only, decay
``min(1 - 1/(k+1), ema_decay)`` as the authors) on labelled + unlabelled batches:

* the teacher predicts the unlabelled batch; pixel entropy splits it (eqs. 6-7): the
  ``α_t = α0 (1 - t/T)`` highest-entropy fraction (``t`` in epochs, as the authors) is
  unreliable, the rest are pseudo labels for a CE term (``L_u``);
* unreliable pixels become negatives of a per-class memory-bank InfoNCE (``L_c``, eq. 4):
  anchors = student features of low-entropy pixels with teacher ``p_c > δ_p``, positive = the
  teacher's class centre in the batch, negatives = teacher features of high-entropy pixels whose
  rank of ``c`` lies in ``[r_l, r_h)`` (labelled images: rank < r_l and label ≠ c), queued per class.
* ``L = L_s + λ_u L_u + λ_c L_c`` (eq. 1; the paper's λ_c = 0.1, the authors' configs run 1).

Representation: the output of the network's last block, projected by a small head
(conv3x3-BN-ReLU-conv1x1 to ``feature_dim``; the authors' 256-d head on the decoder) — the
``multi_head`` model with ``shared_blocks: N-1, branch: projection``. The checkpoint is the
teacher; its plain forward is the segmentation head.

Choices where the authors' code does more: one teacher pass in train mode (their second, BN
train-mode pass) gives labels, entropy and features (they take the labels from an extra eval-mode
pass); no CutMix; under DDP each worker keeps its own memory bank (no all-gather of keys) and its
own batch percentile.

Pseudo-label quality (``pseudo_label/miou``, ``kept_fraction`` = reliable fraction,
``class_coverage``, per-class IoU; step = epoch) is measured on the teacher's reliable labels of
the unlabelled batches seen during the epoch, against their ground truth where the dataset has it
(the ground truth is read only for this measurement, never by the loss).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from selftune.config import TrainingStageConfig
from selftune.config.schema import register_stage_config
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, cycle, unwrap
from selftune.methods import u2pl
from selftune.methods.common import IGNORE_INDEX, ema_decay, masked_cross_entropy, resize_labels, zero_loss
from selftune.metrics import PseudoLabelQuality
from selftune.models.multi_head import multi_head_config
from selftune.stages.data import StageData, prepare_data, training_loader
from selftune.stages.job import StageJob, register_stage
from selftune.stages.pseudo_label import _loggable, quality_summary
from selftune.stages.teacher import MeanTeacher, multi_head_job, multi_head_student
from selftune.stages.training import fit, steps_per_epoch


@register_stage_config
class U2PLStage(TrainingStageConfig):
    """Online U2PL; ``init_from`` an optional supervised warm-up stage (its head initialises ``f``)."""

    reference_fields: ClassVar[tuple[str, ...]] = ("init_from",)

    kind: Literal["u2pl"] = "u2pl"
    unlabelled_batch_size: int = Field(16, ge=1)
    alpha0: float = Field(0.2, ge=0, le=1)  # initial unreliable fraction (table 7: 10-40 %, best 20 %)
    unsup_weight: float = Field(1.0, ge=0)  # λ_u
    authors_scaling: bool = False  # True: the authors' extra B·H·W / N_kept factor on L_u
    contrastive_weight: float = Field(0.1, ge=0)  # λ_c (paper 0.1; the authors' configs run 1)
    anchor_alpha: float = Field(0.2, ge=0, le=1)  # low-/high-entropy fraction for anchors / negatives (authors' 20 %)
    r_l: int = Field(3, ge=0)
    r_h: int = Field(20, ge=1)
    delta_p: float = Field(0.3, ge=0, le=1)
    temperature: float = Field(0.5, gt=0)
    num_queries: int = Field(256, ge=1)
    num_negatives: int = Field(50, ge=1)
    memory_size: int = Field(30000, ge=1)  # keys per class in the bank
    feature_dim: int = Field(64, ge=1)  # projection width (the authors: 256)
    ema_decay: float = Field(0.99, ge=0, le=1)  # the cap of min(1 - 1/(k+1), ema_decay)


def paired(labelled: Iterator[Batch], unlabelled: Iterator[Batch]) -> Iterator[dict[str, torch.Tensor]]:
    for a, b in zip(labelled, unlabelled):
        yield {"image_l": a["image"], "mask_l": a["mask"], "image_u": b["image"], "truth_u": b["mask"], "valid_u": b["valid"]}


class U2PLTerms:
    """``compute_losses`` of eq. 1 plus the per-epoch pseudo-label quality it accumulates."""

    def __init__(self, stage: U2PLStage, steps: int, num_classes: int, device: torch.device, seed: int):
        self.stage, self.steps = stage, steps
        self.bank = u2pl.ClassMemoryBank(num_classes, stage.memory_size, stage.feature_dim, device=device)
        self.quality = PseudoLabelQuality(num_classes)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.calls = 0

    def fractions(self) -> tuple[float, float]:
        """(α_t, anchor α_t) of the current epoch (eq. 7, t counted in epochs from 0)."""
        epoch = min(self.calls // self.steps, self.stage.epochs - 1)
        factor = u2pl.alpha_schedule(1.0, epoch, self.stage.epochs)
        return self.stage.alpha0 * factor, self.stage.anchor_alpha * factor

    def __call__(self, model, batch) -> dict[str, torch.Tensor]:
        stage, pair = self.stage, unwrap(model)
        alpha, anchor_alpha = self.fractions()
        self.calls += 1
        n = batch["image_l"].shape[0]
        images = torch.cat([batch["image_l"], batch["image_u"]])  # (B, 3, H, W)
        t_logits, t_features = pair.teach(images, both=True)
        probs = F.softmax(t_logits.float(), dim=1)  # (B, C, H, W)
        padding = ~batch["valid_u"]
        pseudo = u2pl.reliable_pseudo_labels(probs[n:], alpha, padding)  # (B_u, H, W), 255 = unreliable
        self._measure(pseudo, batch["truth_u"])
        logits, features = model(images, both=True)  # student: (B, C, H, W), (B, D, h, w)
        terms = {
            "sup": masked_cross_entropy(logits[:n], batch["mask_l"]),
            "unsup": stage.unsup_weight * u2pl.unsupervised_loss(logits[n:], pseudo, authors_scaling=stage.authors_scaling),
        }
        if stage.contrastive_weight > 0:
            terms["contrastive"] = stage.contrastive_weight * self._contrastive(
                features, t_features, probs, batch["mask_l"], padding, anchor_alpha, n,
            )
        else:  # keep the projection head in the graph: DDP expects a gradient for every parameter
            terms["contrastive"] = zero_loss(features)
        return terms

    def _contrastive(self, features, t_features, probs, mask_l, padding, anchor_alpha, n) -> torch.Tensor:
        size = features.shape[-2:]
        labels_u = probs[n:].argmax(dim=1).masked_fill(padding, IGNORE_INDEX)
        low_u, high_u = u2pl.contrastive_entropy_masks(probs[n:], anchor_alpha, padding)
        labels = resize_labels(torch.cat([mask_l, labels_u]), size)  # (B, h, w)
        valid_l = labels[:n] != IGNORE_INDEX
        low = torch.cat([valid_l, resize_labels(low_u, size)])
        high = torch.cat([valid_l, resize_labels(high_u, size)])
        labelled = torch.arange(labels.shape[0], device=labels.device) < n
        samples, valid = u2pl.build_contrastive_samples(
            features, t_features, F.interpolate(probs, size=size, mode="bilinear", align_corners=False),
            labels, low, high, labelled, self.bank, delta_p=self.stage.delta_p, r_l=self.stage.r_l,
            r_h=self.stage.r_h, num_queries=self.stage.num_queries, num_negatives=self.stage.num_negatives,
            generator=self.generator,
        )
        return u2pl.memory_bank_contrastive_loss(samples, valid, self.stage.temperature, like=features)

    @torch.no_grad()
    def _measure(self, pseudo: torch.Tensor, truth: torch.Tensor) -> None:
        self.quality.update(pseudo, truth)

    def epoch_quality(self, data: StageData) -> dict[str, float]:
        """All-reduced quality of this epoch's reliable labels (every rank calls it), then reset."""
        self.quality.all_reduce()
        summary = _loggable(quality_summary(self.quality, data))
        self.quality.reset()
        return summary


@register_stage("u2pl")
def run_u2pl(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: U2PLStage = job.stage  # type: ignore[assignment]
    if stage.r_l >= stage.r_h:
        raise ValueError(f"u2pl: need r_l < r_h, but got r_l={stage.r_l}, r_h={stage.r_h}")
    model = job.pipeline.model
    config = multi_head_config(model.name, dict(model.options), shared_blocks="N-1", branch="projection",
                               projection_dim=stage.feature_dim)
    job, init = multi_head_job(job, config)
    data = prepare_data(job.pipeline.data, job.seed)
    student = multi_head_student(job, data.num_classes, init)
    pair = MeanTeacher(student, lambda k: ema_decay(k, stage.ema_decay), parameters_only=True, teacher_train_mode=True)

    has_truth = all(sample.mask is not None for sample in data.unlabelled)
    labelled = training_loader(data, data.labelled, job.pipeline.data, ctx, batch_size=stage.batch_size, seed=job.seed)
    unlabelled = training_loader(
        data, data.unlabelled, job.pipeline.data, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks="ground_truth" if has_truth else "none",
    )
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.unlabelled), stage.unlabelled_batch_size, ctx.world_size)
    terms = U2PLTerms(stage, steps, data.num_classes, ctx.device, job.seed * 1000 + ctx.rank)
    return fit(
        job, ctx, data, batches=paired(cycle(labelled), cycle(unlabelled)), steps_per_epoch=steps,
        compute_losses=terms, model=pair,
        on_epoch_end=(lambda epoch, network: terms.epoch_quality(data)) if has_truth else None,
    )
