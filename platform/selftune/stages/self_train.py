"""``self_train``: labelled CE + ``pseudo_weight`` · CE on pseudo-labelled unlabelled images.

Labelled and pseudo-labelled images go through the network as one concatenated batch (one
forward, shared BN statistics, as DST-CBC's code does), then the logits are split per term; each
term is the mean over its own kept pixels. DST-CBC's dynamic loss, with its one shared pixel
denominator, is its own kind (``dst_train``, ``stages.dst_cbc``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from selftune.config import PseudoLabelledTraining, SelfTrainStage, register_stage
from selftune.data import IGNORE_INDEX, TwoStreamBatch, cycle, two_streams
from selftune.engine.context import WorkerContext
from selftune.engine.loop import LossFn
from selftune.methods.common import class_weighted_cross_entropy, masked_cross_entropy
from selftune.stages.data import StageData, prepare_data, training_loader
from selftune.stages.job import StageJob
from selftune.stages.training import enet_weights, initial_model, steps_per_epoch, train_network


def self_training_terms(pseudo_weight: float, class_weights: torch.Tensor | None = None):
    """Loss terms of one two-stream batch: labelled CE, ``pseudo_weight`` · CE on pseudo labels
    (both class-weighted with ``class_weights`` (C,) when given)."""

    def compute(model, batch: TwoStreamBatch, state=None) -> dict[str, torch.Tensor]:
        logits = model(batch.joint("image"))  # (B_l + B_u, C, H, W)
        n = batch.n_labelled
        masks = batch.joint("mask")
        if class_weights is not None:
            seg = class_weighted_cross_entropy(logits[:n], masks[:n], class_weights)
            return {"seg": seg, "pseudo": pseudo_weight * class_weighted_cross_entropy(logits[n:], masks[n:], class_weights)}
        seg = F.cross_entropy(logits[:n], masks[:n], ignore_index=IGNORE_INDEX)
        return {"seg": seg, "pseudo": pseudo_weight * masked_cross_entropy(logits[n:], masks[n:])}

    return compute


def pseudo_labelled_batches(job: StageJob, ctx: WorkerContext, data: StageData, stage: PseudoLabelledTraining, samples=None, **loader):
    """Labelled batches beside pseudo-labelled ones (``job.inputs["pseudo_labels"]``), and the steps
    per epoch: one pass over the pseudo-labelled images unless the stage says otherwise."""
    config = job.pipeline.data
    samples = data.unlabelled if samples is None else samples
    labelled = training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed)
    pseudo = training_loader(
        data, samples, config, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks=job.inputs["pseudo_labels"], **loader,
    )
    steps = steps_per_epoch(stage.steps_per_epoch, len(samples), stage.unlabelled_batch_size, ctx.world_size)
    return two_streams(cycle(labelled), cycle(pseudo)), steps


def train_on_pseudo_labels(job: StageJob, ctx: WorkerContext, losses: Callable[[StageData], LossFn]) -> dict[str, Any]:
    """A stage that trains the ``init`` network (or a fresh one) on labelled + pseudo-labelled
    batches; ``losses(data)`` builds its ``compute_losses``."""
    data = prepare_data(job.pipeline.data, job.seed)
    network, model_config = initial_model(job, data.num_classes)
    batches, steps = pseudo_labelled_batches(job, ctx, data, job.stage)
    return train_network(job, ctx, data, network, model_config, batches=batches, steps_per_epoch=steps,
                         compute_losses=losses(data))


@register_stage(SelfTrainStage)
def run_self_train(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SelfTrainStage = job.stage  # type: ignore[assignment]
    return train_on_pseudo_labels(job, ctx, lambda data: self_training_terms(stage.pseudo_weight, enet_weights(stage, data, ctx)))
