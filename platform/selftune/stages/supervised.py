"""``supervised``: cross-entropy on the labelled images only (the first stage of every method)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from selftune.config import SupervisedStage
from selftune.data import IGNORE_INDEX
from selftune.engine.context import WorkerContext
from selftune.engine.loop import cycle
from selftune.stages.data import prepare_data, training_loader
from selftune.stages.job import StageJob, register_stage
from selftune.stages.training import fit, steps_per_epoch


def cross_entropy_terms(model, batch) -> dict:
    return {"seg": F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=IGNORE_INDEX)}


@register_stage("supervised")
def run_supervised(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SupervisedStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    loader = training_loader(data, data.labelled, job.pipeline.data, ctx, batch_size=stage.batch_size, seed=job.seed)
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.labelled), stage.batch_size, ctx.world_size)
    return fit(job, ctx, data, batches=cycle(loader), steps_per_epoch=steps, compute_losses=cross_entropy_terms)
