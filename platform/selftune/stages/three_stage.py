"""``multi_task``: stages 2 and 3 of three-stage self-training (Ke et al., seed 000, Algorithm 1).

A multi-head network (``selftune.models.multi_head``: main head ``f`` and a branch that shares
the first ``shared_blocks`` modules, "N-2" for stage 2's ``ĝ``, "N-1" for stage 3's ``g̃``) is
trained from fresh weights (Algorithm 1 re-initialises θ; ``init_from`` is possible but not the
paper) with ``L = L_seg + λ1 L_con + λ2 L_pl`` (eq. 4; eq. 5 for stage 3):

* ``L_seg``: CE of ``f(A x_l)`` against ``B y_l`` (labelled images, ground truth).
* ``L_con`` (eq. 1): CE of ``f(A x)`` against ``B argmax f_θ'(x)`` over L ∪ U, the EMA teacher's
  hard labels moved by the same geometric transform (the authors' hard argmax, taken before the
  warp, as their code does).
* ``L_pl`` (eq. 3): CE of the branch ``g(A x)`` against ``B ŷ`` — the previous stage's stored
  pseudo masks for unlabelled images. For labelled images we use their ground truth instead of the
  previous model's argmax on them (the authors pseudo-label L too; on L the supervised model is
  near its own ground truth, and ground truth is what it approximates).

``A``: one random geometric transform per image (flip, zoom, rotation, shear, translate), applied
in torch on the batch (``methods.three_stage.sample_geometric_transform``), strong photometric
SAUG ops (the dataset's ``image_strong`` view) over L ∪ U, and Cutout on the student's image.
``B``: the same geometric transform on the teacher output / masks (nearest, 255 outside the
image), so the consistency target moves with the input. Teacher θ' = EMA of all float state
(the authors), decay a constant or an epoch schedule (the authors: 0.99 → 0.999 in steps).

The stage's checkpoint is the EMA teacher (see ``stages.teacher``), a ``multi_head`` network
whose plain forward is the main head, so a following ``pseudo_label`` stage writes
``ỹ = argmax f_θ'(x)`` (the authors label the next stage with the teacher's main branch).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from selftune.config import PSEUDO_LABELS, Reference, TrainingStageConfig, register_stage
from selftune.config.kinds import REQUIRED
from selftune.data import IGNORE_INDEX, TwoStreamBatch, cycle, two_streams
from selftune.data.strong import saug_augmentation
from selftune.engine.context import WorkerContext
from selftune.engine.loop import unwrap
from selftune.methods.common import masked_cross_entropy
from selftune.methods.three_stage import (
    apply_cutout,
    apply_geometric_transform,
    cutout_mask,
    pseudo_label_loss,
    sample_geometric_transform,
)
from selftune.schedules import schedule_value, validate_schedule
from selftune.stages.data import prepare_data, training_loader
from selftune.stages.job import StageJob
from selftune.stages.teacher import EmaUpdate, MeanTeacher, multi_head_model_config, multi_head_student
from selftune.stages.training import steps_per_epoch, train_network


class MultiTaskStage(TrainingStageConfig):
    """Stage 2 (``shared_blocks: N-2``) or stage 3 (``N-1``) of three-stage self-training."""

    needs_unlabelled: ClassVar[bool] = True

    kind: Literal["multi_task"] = "multi_task"
    # The pseudo-labelling stage whose masks are ŷ; required.
    pseudo_labels: Annotated[str, Reference("pseudo_labels", PSEUDO_LABELS, when_missing=REQUIRED)]
    unlabelled_batch_size: int = Field(16, ge=1)  # unlabelled images per step (batch_size: labelled ones)
    lambda1: float = Field(0.5, ge=0)  # weight of L_con (paper: 1/2 on Cityscapes)
    lambda2: float = Field(0.5, ge=0)  # weight of L_pl
    ema_decay: float | dict[str, Any] = 0.99  # a constant or a schedule over this stage's epochs
    shared_blocks: int | str = "N-2"  # modules (blocks + head) shared by the two heads
    # A's photometric part: RandAugment-style SAUG ops on the student's images, drawn with
    # replacement (the paper), over L ∪ U (``strong_on_labelled: false``: unlabelled images only).
    strong_ops: int = Field(2, ge=0)
    strong_magnitude: float = Field(0.5, ge=0, le=1)
    ops_with_replacement: bool = True
    strong_on_labelled: bool = True
    # A's geometric part, applied as B to the teacher output and the pseudo masks (the paper's
    # RandAugment geometry: rotate ±30°, shear ±0.3, translate; flip and zoom as the crop).
    flip_prob: float = Field(0.5, ge=0, le=1)
    zoom_range: tuple[float, float] = (1.0, 1.5)
    max_rotation_degrees: float = Field(30.0, ge=0)
    max_shear: float = Field(0.3, ge=0)
    max_translate: float = Field(0.03, ge=0)  # fraction of the image per axis (the authors: 10 px of 321)
    # Always-on Cutout on the student's image (the authors: 3 squares of 32 px); 0 holes: off.
    cutout_holes: int = Field(3, ge=0)
    cutout_size: int = Field(32, ge=1)

    @field_validator("ema_decay")
    @classmethod
    def _decay_schedule(cls, value: float | dict[str, Any]) -> float | dict[str, Any]:
        validate_schedule(value, where="ema_decay")
        return value


def multi_task_terms(stage: MultiTaskStage, generator: torch.Generator):
    """``compute_losses`` of eq. 4: ``{seg, con: λ1 L_con, pl: λ2 L_pl}``."""

    def compute(model, batch: TwoStreamBatch, state=None) -> dict[str, torch.Tensor]:
        pair: MeanTeacher = unwrap(model)  # type: ignore[assignment]
        n = batch.n_labelled
        weak = batch.joint("image")  # (B, 3, H, W) teacher input x
        strong = batch.joint("image_strong" if "image_strong" in batch.labelled else "image", "image_strong")
        valid = batch.joint("valid")  # (B, H, W) False on padding
        params = sample_geometric_transform(
            weak.shape[0], generator, flip_prob=stage.flip_prob, scale_range=stage.zoom_range,
            max_rotation_degrees=stage.max_rotation_degrees, max_shear=stage.max_shear,
            max_translate=stage.max_translate, device=weak.device,
        )
        teacher_labels = pair.teach(weak).argmax(dim=1).masked_fill(~valid, IGNORE_INDEX)  # argmax f_θ'(x)
        con_target = apply_geometric_transform(teacher_labels, params, mode="nearest")  # B argmax f_θ'(x)
        masks = batch.joint("mask")  # ground truth on L, ŷ on U
        moved_masks = apply_geometric_transform(masks, params, mode="nearest")  # B y, B ŷ
        student_input = apply_geometric_transform(strong, params)
        if stage.cutout_holes:
            height, width = student_input.shape[-2:]
            cut = cutout_mask(len(student_input), height, width, generator, holes=stage.cutout_holes,
                              size=stage.cutout_size, device=student_input.device)
            student_input = apply_cutout(student_input, cut)
        main, branch = model(student_input, both=True)  # f(A x), g(A x)
        return {
            "seg": masked_cross_entropy(main[:n], moved_masks[:n]),
            "con": stage.lambda1 * pseudo_label_loss(main, con_target),
            "pl": stage.lambda2 * pseudo_label_loss(branch, moved_masks),
        }

    return compute


def ema_decay_of(stage: MultiTaskStage):
    """Decay of an EMA update: the stage's schedule read at the epoch the update is made in."""
    return lambda updates, epoch_index: schedule_value(stage.ema_decay, epoch_index, stage.epochs)


@register_stage(MultiTaskStage)
def run_multi_task(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: MultiTaskStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    model_config = multi_head_model_config(job, data.num_classes, shared_blocks=stage.shared_blocks)
    student = multi_head_student(job, model_config)  # fresh θ (Algorithm 1) unless init_from
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.unlabelled), stage.unlabelled_batch_size, ctx.world_size)
    pair = MeanTeacher(student, ema_decay_of(stage))
    photometric = lambda: saug_augmentation(stage.strong_ops, stage.strong_magnitude, replace=stage.ops_with_replacement)  # noqa: E731
    labelled = training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed,
                               strong_transform=photometric() if stage.strong_on_labelled else None)
    unlabelled = training_loader(
        data, data.unlabelled, config, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks=job.inputs["pseudo_labels"], strong_transform=photometric(),
    )
    generator = torch.Generator().manual_seed(job.seed * 1000 + ctx.rank)
    return train_network(
        job, ctx, data, pair, model_config, batches=two_streams(cycle(labelled), cycle(unlabelled)),
        steps_per_epoch=steps, compute_losses=multi_task_terms(stage, generator), hooks=[EmaUpdate()],
    )
