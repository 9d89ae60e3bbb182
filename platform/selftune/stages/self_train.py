"""``self_train``: labelled CE + ``pseudo_weight`` · CE on pseudo-labelled unlabelled images.

With ``gamma > 0`` the pseudo term is DST-CBC's dynamic self-training loss (eqs. 1-2): each
pseudo-labelled pixel's CE weighs ``p_cur[label]^gamma`` (current model, detached).

Labelled and pseudo-labelled images go through the network as one concatenated batch (one
forward, shared BN statistics, as DST-CBC's code does), then the logits are split per term.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from selftune.config import SelfTrainStage
from selftune.data import IGNORE_INDEX
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, cycle
from selftune.methods.dst_cbc import dynamic_self_training_loss
from selftune.stages.data import prepare_data, training_loader
from selftune.stages.job import StageJob, register_stage
from selftune.stages.training import fit, steps_per_epoch


def paired(labelled: Iterator[Batch], pseudo: Iterator[Batch]) -> Iterator[Batch]:
    """One labelled and one pseudo-labelled batch per step, concatenated; ``n_labelled`` splits them."""
    for a, b in zip(labelled, pseudo):
        yield {
            "image": torch.cat([a["image"], b["image"]]),
            "mask": torch.cat([a["mask"], b["mask"]]),
            "n_labelled": torch.tensor(len(a["image"])),
        }


def self_training_terms(pseudo_weight: float, gamma: float = 0.0):
    """Loss terms of one paired batch; ``gamma > 0`` switches to DST-CBC's dynamic loss."""
    if gamma > 0:
        return dynamic_self_training_terms(pseudo_weight, gamma)

    def compute(model, batch) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])  # (B_l + B_u, C, H, W)
        n = int(batch["n_labelled"])
        seg = F.cross_entropy(logits[:n], batch["mask"][:n], ignore_index=IGNORE_INDEX)
        pseudo = _masked_cross_entropy(logits[n:], batch["mask"][n:])
        return {"seg": seg, "pseudo": pseudo_weight * pseudo}

    return compute


def dynamic_self_training_terms(pseudo_weight: float, gamma: float):
    """DST-CBC eqs. 1-2 as the authors' ``DynamicLoss`` computes it on ``cat([pseudo, labelled])``:
    ``(sum_labelled CE + sum_pseudo p_cur[y]^gamma CE) / #non-ignored pixels of the whole batch``.

    Both terms share that one denominator (not a mean per term, as ``gamma = 0`` uses), so the
    reported ``seg`` and ``pseudo`` add up to the authors' loss when ``pseudo_weight = 1``.
    """

    def compute(model, batch) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])  # (B_l + B_u, C, H, W)
        n = int(batch["n_labelled"])
        masks = batch["mask"]  # (B_l + B_u, H, W)
        count_l = (masks[:n] != IGNORE_INDEX).sum()
        count_u = (masks[n:] != IGNORE_INDEX).sum()
        total = (count_l + count_u).clamp(min=1)
        # Each helper divides by its own pixel count; rescale both to the shared denominator.
        seg = _masked_cross_entropy(logits[:n], masks[:n]) * (count_l.clamp(min=1) / total)
        pseudo = dynamic_self_training_loss(logits[n:], masks[n:], gamma) * (count_u.clamp(min=1) / total)
        return {"seg": seg, "pseudo": pseudo_weight * pseudo}

    return compute


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over kept pixels; 0 (with a graph) when a batch kept none, instead of NaN."""
    losses = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return losses / (target != IGNORE_INDEX).sum().clamp(min=1)


@register_stage("self_train")
def run_self_train(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SelfTrainStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    labelled = training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed)
    pseudo = training_loader(
        data, data.unlabelled, config, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks=job.inputs["pseudo_labels"],
    )
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.unlabelled), stage.unlabelled_batch_size, ctx.world_size)
    return fit(
        job, ctx, data, batches=paired(cycle(labelled), cycle(pseudo)), steps_per_epoch=steps,
        compute_losses=self_training_terms(stage.pseudo_weight, stage.gamma),
    )
