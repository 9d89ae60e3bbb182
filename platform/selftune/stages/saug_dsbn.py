"""Yuan et al. (seed 003): the student of one teacher -> student iteration (Algorithm 1).

Stage kind ``saug_dsbn_train``: labelled images (weak augmentation) + the teacher's TTA pseudo
labels (``tta_label``) on strongly augmented unlabelled images (``n_ops`` ops of the SAUG pool at
``magnitude``, after the weak scale/crop/flip, Sec. 3.1). With ``dsbn`` the network gets a parallel
BN for the pseudo-labelled images (Sec. 3.2; one forward of ``cat([labelled, strong])`` whose BNs
split at the labelled count, Algorithm 1 line 8); only the normal BN is used at evaluation and the
saved checkpoint is converted back to the plain network (``convert_from_dsbn``), so later stages
load it like any other. With ``scl`` the pseudo term is the self-correction loss (eqs. 4-5),
otherwise CE; the labelled term is always CE (the paper: SCL on pseudo labels only).

The student starts from the teacher (``init_from: previous``; the paper, Sec. 4.2: "the student
model is the same model initialized by the teacher model"). Iterating (student -> teacher) is a
``kind: rounds`` group of ``tta_label`` + ``saug_dsbn_train``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from selftune.config import PseudoLabelledTraining, register_stage
from selftune.config.schema import Fraction01
from selftune.data import IGNORE_INDEX, TwoStreamBatch, saug_augmentation
from selftune.engine.context import WorkerContext
from selftune.methods.common import masked_cross_entropy
from selftune.methods.saug_dsbn import convert_from_dsbn, convert_to_dsbn, self_correction_loss, use_strong_bn
from selftune.stages.data import prepare_data
from selftune.stages.job import StageJob
from selftune.stages.self_train import pseudo_labelled_batches
from selftune.stages.training import initial_model, train_network


class SaugDsbnStage(PseudoLabelledTraining):
    """Student training with SAUG, DSBN and the self-correction loss (each switchable)."""

    kind: Literal["saug_dsbn_train"] = "saug_dsbn_train"  # type: ignore[assignment]
    n_ops: int = Field(2, ge=0)  # SAUG ops per image (0: no strong augmentation)
    magnitude: Fraction01 = 0.5  # SAUG op strength
    ops_with_replacement: bool = True  # the paper draws its N ops with replacement (False: N distinct ops)
    dsbn: bool = True  # parallel BN for the strongly augmented pseudo-labelled images
    scl: bool = True  # self-correction loss on pseudo labels (False: CE)
    scl_label_clip: float = Field(1e-4, gt=0, le=1)  # the clipped log 0 of the one-hot label in RCE


def student_terms(pseudo_weight: float, *, dsbn: bool, scl: bool, label_clip: float = 1e-4):
    """Loss terms of one step: CE on labelled images, ``pseudo_weight`` · (SCL or CE) on pseudo labels.

    One forward of ``cat([labelled, strong views of the pseudo-labelled])`` (the weak view when the
    loader builds no strong one); with ``dsbn`` the BNs send the strong part through their strong
    branch.
    """

    def compute(model, batch: TwoStreamBatch, state=None) -> dict[str, torch.Tensor]:
        n = batch.n_labelled
        images = batch.joint("image", "image_strong" if "image_strong" in batch.unlabelled else "image")
        masks = batch.joint("mask")
        if dsbn:
            with use_strong_bn(model, from_index=n):
                logits = model(images)  # (B_l + B_u, C, H, W)
        else:
            logits = model(images)
        seg = F.cross_entropy(logits[:n], masks[:n], ignore_index=IGNORE_INDEX)
        if scl:
            pseudo = self_correction_loss(logits[n:], masks[n:], label_clip=label_clip)
        else:
            pseudo = masked_cross_entropy(logits[n:], masks[n:])
        return {"seg": seg, "pseudo": pseudo_weight * pseudo}

    return compute


def plain_network(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of a DSBN network with only its normal BNs: the test-time network a checkpoint holds."""
    return convert_from_dsbn(copy.deepcopy(network))


@register_stage(SaugDsbnStage)
def run_saug_dsbn_train(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SaugDsbnStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    network, model_config = initial_model(job, data.num_classes)
    if stage.dsbn:
        network = convert_to_dsbn(network)  # before fit builds the optimizer, so the strong BNs train
    strong = saug_augmentation(stage.n_ops, stage.magnitude, replace=stage.ops_with_replacement) if stage.n_ops > 0 else None
    batches, steps = pseudo_labelled_batches(job, ctx, data, stage, strong_transform=strong)
    return train_network(
        job, ctx, data, network, model_config, batches=batches, steps_per_epoch=steps,
        compute_losses=student_terms(stage.pseudo_weight, dsbn=stage.dsbn, scl=stage.scl, label_clip=stage.scl_label_clip),
        export=plain_network if stage.dsbn else None,
    )
