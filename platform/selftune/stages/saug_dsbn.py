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

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from selftune.config import SelfTrainStage
from selftune.config.schema import Fraction01, register_stage_config
from selftune.data import IGNORE_INDEX, saug_augmentation, weak_augmentation
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, cycle
from selftune.methods.saug_dsbn import convert_from_dsbn, convert_to_dsbn, self_correction_loss, use_strong_bn
from selftune.models import save_checkpoint
from selftune.stages.data import prepare_data, training_loader
from selftune.stages.job import CHECKPOINT, StageJob, register_stage
from selftune.stages.self_train import _masked_cross_entropy
from selftune.stages.training import fit, initial_model, steps_per_epoch
from selftune.stages.tta import augmented_loader


@register_stage_config
class SaugDsbnStage(SelfTrainStage):
    """Student training with SAUG, DSBN and the self-correction loss (each switchable)."""

    kind: Literal["saug_dsbn_train"] = "saug_dsbn_train"  # type: ignore[assignment]
    n_ops: int = Field(2, ge=0)  # SAUG ops per image (0: no strong augmentation)
    magnitude: Fraction01 = 0.5  # SAUG op strength
    dsbn: bool = True  # parallel BN for the strongly augmented pseudo-labelled images
    scl: bool = True  # self-correction loss on pseudo labels (False: CE)
    scl_label_clip: float = Field(1e-4, gt=0, le=1)  # the clipped log 0 of the one-hot label in RCE

    @model_validator(mode="after")
    def _no_dynamic_weight(self) -> "SaugDsbnStage":
        # self_train's DST-CBC gamma is inherited but has no meaning next to SCL's own weighting.
        if getattr(self, "gamma", 0.0):
            raise ValueError(f"gamma is DST-CBC's weight and is not used by saug_dsbn_train; leave it 0, got {self.gamma}")
        return self


def student_terms(pseudo_weight: float, *, dsbn: bool, scl: bool, label_clip: float = 1e-4):
    """Loss terms of one step: CE on labelled images, ``pseudo_weight`` · (SCL or CE) on pseudo labels.

    The batch is ``paired_strong``'s: labelled images first (``n_labelled`` of them), then the
    strong views of the pseudo-labelled ones. With ``dsbn`` the BNs send the strong part through
    their strong branch.
    """

    def compute(model, batch: Batch) -> dict[str, torch.Tensor]:
        n = int(batch["n_labelled"])
        if dsbn:
            with use_strong_bn(model, from_index=n):
                logits = model(batch["image"])  # (B_l + B_u, C, H, W)
        else:
            logits = model(batch["image"])
        seg = F.cross_entropy(logits[:n], batch["mask"][:n], ignore_index=IGNORE_INDEX)
        if scl:
            pseudo = self_correction_loss(logits[n:], batch["mask"][n:], label_clip=label_clip)
        else:
            pseudo = _masked_cross_entropy(logits[n:], batch["mask"][n:])
        return {"seg": seg, "pseudo": pseudo_weight * pseudo}

    return compute


def paired_strong(labelled, pseudo):
    """One labelled batch and the strong view of one pseudo-labelled batch per step, concatenated."""
    for a, b in zip(labelled, pseudo):
        strong = b.get("image_strong", b["image"])  # n_ops = 0: no strong view, the weak one
        yield {
            "image": torch.cat([a["image"], strong]),
            "mask": torch.cat([a["mask"], b["mask"]]),
            "n_labelled": torch.tensor(len(a["image"])),
        }


def save_plain_checkpoint(folder: Path, job: StageJob, num_classes: int) -> None:
    """Rewrite the best DSBN checkpoint that ``fit`` kept as the plain (normal-BN) network."""
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    network, model_config = initial_model(job, num_classes)
    network = convert_to_dsbn(network)
    network.load_state_dict(state, strict=True)
    import json

    record = json.loads((folder / "model.json").read_text())
    extra = {k: v for k, v in record.items() if k not in ("name", "num_classes", "options")}
    save_checkpoint(folder, convert_from_dsbn(network), model_config, extra=extra)


@register_stage("saug_dsbn_train")
def run_saug_dsbn_train(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SaugDsbnStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    labelled = training_loader(data, data.labelled, config, ctx, batch_size=stage.batch_size, seed=job.seed)
    pseudo = augmented_loader(
        data, data.unlabelled, job, ctx, batch_size=stage.unlabelled_batch_size, seed=job.seed + 1,
        masks=job.inputs["pseudo_labels"],
        transform=weak_augmentation(config.crop_size, scale_range=config.scale_range, hflip=config.hflip),
        strong_transform=saug_augmentation(stage.n_ops, stage.magnitude) if stage.n_ops > 0 else None,
    )
    torch.manual_seed(job.seed + job.stage_index)  # the same draw fit() makes for fresh weights
    model, _ = initial_model(job, data.num_classes)
    if stage.dsbn:
        model = convert_to_dsbn(model)  # before fit builds the optimizer, so the strong BNs train
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.unlabelled), stage.unlabelled_batch_size, ctx.world_size)
    summary = fit(
        job, ctx, data, batches=paired_strong(cycle(labelled), cycle(pseudo)), steps_per_epoch=steps,
        compute_losses=student_terms(stage.pseudo_weight, dsbn=stage.dsbn, scl=stage.scl, label_clip=stage.scl_label_clip),
        model=model,
    )
    if stage.dsbn and ctx.is_main:
        save_plain_checkpoint(job.output(CHECKPOINT), job, data.num_classes)
    return summary
