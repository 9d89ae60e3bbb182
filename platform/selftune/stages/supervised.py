"""``supervised``: cross-entropy on the labelled images only (the first stage of every method)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selftune.config import SupervisedStage, register_stage
from selftune.data import IGNORE_INDEX, cycle
from selftune.engine.context import WorkerContext
from selftune.stages.data import prepare_data, training_loader
from selftune.stages.job import StageJob
from selftune.methods.common import class_weighted_cross_entropy
from selftune.stages.training import enet_weights, initial_model, steps_per_epoch, train_network


def cross_entropy_terms(model, batch, state=None) -> dict:
    return {"seg": F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=IGNORE_INDEX)}


def supervised_terms(class_weights: torch.Tensor | None):
    """Plain cross-entropy, or class-weighted with ``class_weights`` (C,)."""
    if class_weights is None:
        return cross_entropy_terms

    def compute(model, batch, state=None) -> dict:
        return {"seg": class_weighted_cross_entropy(model(batch["image"]), batch["mask"], class_weights)}

    return compute


@register_stage(SupervisedStage)
def run_supervised(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SupervisedStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    network, model_config = initial_model(job, data.num_classes)
    loader = training_loader(data, data.labelled, job.pipeline.data, ctx, batch_size=stage.batch_size, seed=job.seed)
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.labelled), stage.batch_size, ctx.world_size)
    return train_network(job, ctx, data, network, model_config, batches=cycle(loader), steps_per_epoch=steps,
                         compute_losses=supervised_terms(enet_weights(stage, data, ctx)))
