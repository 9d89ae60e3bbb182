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
teacher; its plain forward is the segmentation head. ``EmaUpdate`` moves the teacher after every
optimizer step; ``α_t`` reads the epoch from the training state.

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

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from selftune.config import TrainingStageConfig, register_stage
from selftune.data import TwoStreamBatch, cycle, two_streams
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, TrainState, predict, unwrap
from selftune.methods import u2pl
from selftune.methods.common import (
    IGNORE_INDEX, apply_cutmix, cutmix_boxes, ema_decay, masked_cross_entropy, resize_labels, zero_loss,
)
from selftune.metrics import PseudoLabelQuality
from selftune.stages.data import StageData, has_ground_truth, prepare_data, training_loader
from selftune.stages.job import StageJob
from selftune.stages.labelling import label_samples, log_quality, loggable, quality_summary
from selftune.stages.teacher import EmaUpdate, MeanTeacher, multi_head_model_config, multi_head_student
from selftune.stages.training import steps_per_epoch, train_network


class U2PLStage(TrainingStageConfig):
    """Online U2PL; ``init_from`` an optional supervised warm-up stage (its head initialises ``f``)."""

    needs_unlabelled: ClassVar[bool] = True

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
    # CutMix on the student's unlabelled input (the authors: p = 0.5, one box from the next image of
    # the batch); the teacher's labels come from an eval-mode pass on the clean images, mixed alike.
    cutmix_p: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _rank_window(self) -> "U2PLStage":
        if self.r_l >= self.r_h:
            raise ValueError(f"the negatives' rank window needs r_l < r_h, but got r_l={self.r_l}, r_h={self.r_h}")
        return self


class U2PLTerms:
    """``compute_losses`` of eq. 1; it also accumulates the quality of the reliable labels it makes."""

    def __init__(self, stage: U2PLStage, num_classes: int, device: torch.device, seed: int):
        self.stage = stage
        self.bank = u2pl.ClassMemoryBank(num_classes, stage.memory_size, stage.feature_dim, device=device)
        self.quality = PseudoLabelQuality(num_classes)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def fractions(self, state: TrainState) -> tuple[float, float]:
        """(α_t, anchor α_t) of the current epoch (eq. 7, t counted in epochs from 0)."""
        factor = u2pl.alpha_schedule(1.0, state.epoch_index, self.stage.epochs)
        return self.stage.alpha0 * factor, self.stage.anchor_alpha * factor

    def __call__(self, model, batch: TwoStreamBatch, state: TrainState) -> dict[str, torch.Tensor]:
        stage, pair = self.stage, unwrap(model)
        alpha, anchor_alpha = self.fractions(state)
        n = batch.n_labelled
        images_u, padding, truth = batch.unlabelled["image"], ~batch.unlabelled["valid"], batch.unlabelled["mask"]
        labels_u = None  # without CutMix: the train-mode teacher's own argmax on the batch
        if stage.cutmix_p > 0:
            labels_u = pair.teach_eval(images_u).argmax(dim=1)  # (B_u, H, W) on the clean images
            box, partner = cutmix_boxes(*images_u.shape[:1], *images_u.shape[-2:], self.generator,
                                        p=stage.cutmix_p, device=images_u.device)
            images_u, labels_u, padding, truth = (apply_cutmix(t, box, partner) for t in (images_u, labels_u, padding, truth))
        images = torch.cat([batch.labelled["image"], images_u])  # (B, 3, H, W)
        t_logits, t_features = pair.teach(images, both=True)  # entropy and features of the input the student sees
        probs = F.softmax(t_logits.float(), dim=1)  # (B, C, H, W)
        if labels_u is None:
            pseudo = u2pl.reliable_pseudo_labels(probs[n:], alpha, padding)  # (B_u, H, W), 255 = unreliable
            labels_u = probs[n:].argmax(dim=1)
        else:
            reliable = u2pl.entropy_reliable_mask(probs[n:], alpha, padding)
            pseudo = torch.where(reliable, labels_u, torch.full_like(labels_u, IGNORE_INDEX))
        self._measure(pseudo, truth)
        logits, features = model(images, both=True)  # student: (B, C, H, W), (B, D, h, w)
        terms = {
            "sup": masked_cross_entropy(logits[:n], batch.labelled["mask"]),
            "unsup": stage.unsup_weight * u2pl.unsupervised_loss(logits[n:], pseudo, authors_scaling=stage.authors_scaling),
        }
        if stage.contrastive_weight > 0:
            terms["contrastive"] = stage.contrastive_weight * self._contrastive(
                features, t_features, probs, batch.labelled["mask"], labels_u, padding, anchor_alpha, n,
            )
        else:  # keep the projection head in the graph: DDP expects a gradient for every parameter
            terms["contrastive"] = zero_loss(features)
        return terms

    def _contrastive(self, features, t_features, probs, mask_l, labels_u, padding, anchor_alpha, n) -> torch.Tensor:
        size = features.shape[-2:]
        labels_u = labels_u.masked_fill(padding, IGNORE_INDEX)
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


class ReliableLabelQuality(Hook):
    """Each epoch's quality of the reliable labels U2PL trained on — training crops, the train-mode
    teacher, CutMix included — as ``train_label/*`` (all-reduced; every rank), then reset."""

    def __init__(self, terms: U2PLTerms, data: StageData):
        self.terms, self.data = terms, data

    def after_epoch(self, state: TrainState, model: torch.nn.Module) -> None:
        self.terms.quality.all_reduce()
        quality = loggable(quality_summary(self.terms.quality, self.data))
        state.metrics.update({key.replace("pseudo_label/", TRAIN_LABEL, 1): value for key, value in quality.items()})
        self.terms.quality.reset()


class FinalLabelQuality(Hook):
    """After training, the kept teacher's reliable labels of the whole unlabelled set in eval mode
    at the last epoch's α_t: ``pseudo_label/*``, measured as every labelling stage measures it."""

    def __init__(self, job: StageJob, ctx: WorkerContext, data: StageData, terms: U2PLTerms):
        self.job, self.ctx, self.data, self.terms = job, ctx, data, terms
        self.summary: dict[str, Any] = {}

    def after_train(self, state: TrainState, model: torch.nn.Module) -> None:
        alpha, _ = self.terms.fractions(state)
        teacher = unwrap(model).teacher

        def labeller(network, batch):
            probs = predict(network, batch["image"], self.ctx)
            return u2pl.reliable_pseudo_labels(probs, alpha, ~batch["valid"])

        quality = label_samples(teacher, self.data.unlabelled, self.data, self.job, self.ctx, None, labeller)
        if quality is not None:
            self.summary = quality_summary(quality, self.data)
            if self.ctx.is_main:
                log_quality(self.ctx, self.summary, step=state.epochs)
        teacher.train(unwrap(model).teacher_train_mode)


TRAIN_LABEL = "train_label/"


@register_stage(U2PLStage)
def run_u2pl(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: U2PLStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    model_config = multi_head_model_config(job, data.num_classes, shared_blocks="N-1", branch="projection",
                                           projection_dim=stage.feature_dim)
    student = multi_head_student(job, model_config)
    pair = MeanTeacher(student, lambda updates, epoch: ema_decay(updates, stage.ema_decay),
                       parameters_only=True, teacher_train_mode=True)

    truth = has_ground_truth(data.unlabelled)
    labelled = training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed)
    unlabelled = training_loader(
        data, data.unlabelled, config, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks="ground_truth" if truth else "none",
    )
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.unlabelled), stage.unlabelled_batch_size, ctx.world_size)
    terms = U2PLTerms(stage, data.num_classes, ctx.device, job.seed * 1000 + ctx.rank)
    final = FinalLabelQuality(job, ctx, data, terms)
    hooks: list[Hook] = [EmaUpdate(), *([ReliableLabelQuality(terms, data), final] if truth else [])]
    summary = train_network(
        job, ctx, data, pair, model_config, batches=two_streams(cycle(labelled), cycle(unlabelled)),
        steps_per_epoch=steps, compute_losses=terms, hooks=hooks,
    )
    return {**summary, **{k: v for k, v in final.summary.items() if not isinstance(v, dict)}}
