"""ST++ (Yang et al., seed 002 second part): selective re-training by image-level stability.

Stage kinds (their math is in ``selftune.methods.st_plus_plus``):

* ``supervised_snapshots``: supervised CE that also saves the model after epochs E/K, 2E/K … E
  (``snapshots/<j>/``, j = 1..K) for the stability score; ``checkpoint/`` keeps the best-val model.
* ``stability_select``: eq. 4 stability per unlabelled image over the K snapshots (plain argmax,
  no TTA, as the authors); the top ``reliable_fraction`` are labelled with the best model + TTA.
  Only the reliable images get a PNG in ``pseudo_labels/``; ``reliable.txt`` / ``unreliable.txt``
  list the ids, most stable first.
* ``st_retrain``: labelled CE + CE on the images of a pseudo-label folder, ST++'s strong
  augmentation on the pseudo-labelled images only (Cutout pixels ignored), from fresh weights
  (``init_from`` left out: the authors restart every re-training from the initial weights).
* ``relabel_unreliable``: the re-trained model labels (TTA) the images the ``keep_from`` stage left
  unlabelled; its ``pseudo_labels/`` holds those plus a copy of ``keep_from``'s labels, so the
  final ``st_retrain`` trains on everything.

Reference defaults: ``model_from`` of the labelling stages, ``pseudo_labels`` of ``st_retrain`` and
``snapshots_from`` default to the closest earlier stage that produces a model, pseudo labels or
snapshots (``config.loader.resolve_references``); ``keep_from`` must be named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import albumentations as A
import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from selftune.config import MODEL, PSEUDO_LABELS, SNAPSHOTS, Reference, SelfTrainStage, SupervisedStage, register_stage
from selftune.config.kinds import CLOSEST, REQUIRED
from selftune.config.schema import Fraction01
from selftune.data import cycle, read_mask, st_plus_plus_augmentation, weak_augmentation
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, TrainState, to_device, unwrap
from selftune.engine.progress import counted
from selftune.errors import ConfigError
from selftune.methods.st_plus_plus import per_image_miou, snapshot_epochs, split_reliable, stability_scores
from selftune.metrics import PseudoLabelQuality
from selftune.models import load_checkpoint, save_checkpoint
from selftune.stages.data import StageData, evaluation_loader, has_ground_truth, prepare_data, training_loader
from selftune.stages.job import PSEUDO_LABELS_FOLDER, SNAPSHOTS_FOLDER, StageJob
from selftune.stages.labelling import label_and_measure, log_quality, quality_summary
from selftune.stages.self_train import pseudo_labelled_batches, self_training_terms
from selftune.stages.supervised import cross_entropy_terms
from selftune.stages.training import ModelConfig, enet_weights, initial_model, steps_per_epoch, train_network
from selftune.stages.tta import TtaLabelStage, tta_labeller

ST_PLUS_PLUS_SCALES = [0.5, 0.75, 1.0, 1.5, 2.0]  # the authors' label() scales


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


class SupervisedSnapshotsStage(SupervisedStage):
    """Supervised CE, saving ``snapshots`` (K) checkpoints at epochs j*E//K for the stability score."""

    produces: ClassVar[frozenset[str]] = frozenset({MODEL, SNAPSHOTS})

    kind: Literal["supervised_snapshots"] = "supervised_snapshots"  # type: ignore[assignment]
    snapshots: int = Field(3, ge=2)  # K (authors: 3)

    @model_validator(mode="after")
    def _one_epoch_per_snapshot(self) -> "SupervisedSnapshotsStage":
        snapshot_epochs(self.epochs, self.snapshots)  # ValueError -> a config error naming the stage
        return self


class StabilitySelectStage(TtaLabelStage):
    """Rank unlabelled images by stability; label the top ``reliable_fraction`` with the best model + TTA."""

    kind: Literal["stability_select"] = "stability_select"  # type: ignore[assignment]
    scales: list[float] = Field(default_factory=lambda: list(ST_PLUS_PLUS_SCALES), min_length=1)
    # A supervised_snapshots stage; None: the closest earlier one.
    snapshots_from: Annotated[str | None, Reference("snapshots", SNAPSHOTS, when_missing=CLOSEST)] = None
    reliable_fraction: Fraction01 = 0.5  # R (authors: top half)


class StRetrainStage(SelfTrainStage):
    """Labelled CE + CE on the images of ``pseudo_labels`` under ST++'s strong augmentation."""

    kind: Literal["st_retrain"] = "st_retrain"  # type: ignore[assignment]
    strong_p: Fraction01 = 1.0  # probability a pseudo-labelled image gets the strong recipe (0 = weak only)
    cutout_p: Fraction01 = 0.5  # Cutout probability inside the recipe (authors 0.5)


class RelabelUnreliableStage(TtaLabelStage):
    """Label (TTA) the images ``keep_from`` did not label; keep ``keep_from``'s labels for the rest."""

    kind: Literal["relabel_unreliable"] = "relabel_unreliable"  # type: ignore[assignment]
    scales: list[float] = Field(default_factory=lambda: list(ST_PLUS_PLUS_SCALES), min_length=1)
    # The stability_select stage whose (reliable) labels are kept; required.
    keep_from: Annotated[str, Reference("pseudo_labels", PSEUDO_LABELS, when_missing=REQUIRED)]


# --------------------------------------------------------------------------------------------
# supervised_snapshots
# --------------------------------------------------------------------------------------------


class SaveSnapshots(Hook):
    """After the epochs ``save_at``, save the network to ``snapshots/<j>/`` (j = 1..K, rank 0)."""

    def __init__(self, folder: Path, save_at: list[int], model_config: ModelConfig, ctx: WorkerContext):
        self.folder, self.save_at, self.model_config, self.ctx = folder, save_at, model_config, ctx

    def after_epoch(self, state: TrainState, model: torch.nn.Module) -> None:
        if state.epoch in self.save_at and self.ctx.is_main:
            index = self.save_at.index(state.epoch) + 1
            save_checkpoint(self.folder / str(index), unwrap(model), self.model_config, extra={"epoch": state.epoch})


@register_stage(SupervisedSnapshotsStage)
def run_supervised_snapshots(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: SupervisedSnapshotsStage = job.stage  # type: ignore[assignment]
    save_at = snapshot_epochs(stage.epochs, stage.snapshots)  # validated with the config
    data = prepare_data(job.pipeline.data, job.seed)
    network, model_config = initial_model(job, data.num_classes)
    loader = training_loader(data, data.labelled, job.pipeline.data, ctx, batch_size=stage.batch_size, seed=job.seed)
    steps = steps_per_epoch(stage.steps_per_epoch, len(data.labelled), stage.batch_size, ctx.world_size)
    summary = train_network(
        job, ctx, data, network, model_config, batches=cycle(loader), steps_per_epoch=steps,
        compute_losses=cross_entropy_terms, hooks=[SaveSnapshots(job.output(SNAPSHOTS_FOLDER), save_at, model_config, ctx)],
    )
    return {**summary, "snapshot_epochs": save_at}


# --------------------------------------------------------------------------------------------
# stability_select
# --------------------------------------------------------------------------------------------


def load_snapshots(folder: Path) -> list[torch.nn.Module]:
    """The K snapshot models, in epoch order (folders ``1`` … ``K``)."""
    names = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if len(names) < 2:
        raise ConfigError(f"{folder} holds {len(names)} snapshot(s); stability needs a supervised_snapshots stage with K >= 2")
    return [load_checkpoint(p)[0] for p in names]


@torch.no_grad()
def score_images(
    snapshots: list[torch.nn.Module], data: StageData, job: StageJob, ctx: WorkerContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stability, last-snapshot mIoU against ground truth) per unlabelled image, (N,) float64 each,
    gathered from every worker. The ground-truth column is NaN where the images have no masks; it
    is for diagnosis only (does stability pick the images the model gets right?)."""
    models = [m.to(ctx.device).eval() for m in snapshots]
    truth_known = has_ground_truth(data.unlabelled)
    loader = evaluation_loader(data, data.unlabelled, job.pipeline.data, ctx, masks="ground_truth" if truth_known else "none",
                               one_pass=True)  # each image read once: no decode cache
    rows: list[tuple[int, float, float]] = []
    for batch in counted(loader, f"  [{job.stage.name}] scoring", len(data.unlabelled), enabled=ctx.is_main, workers=ctx.world_size):
        batch = to_device(batch, ctx.device)
        padding = ~batch["valid"]  # (B, H, W) pixels added by pad_collate
        masks = []
        for model in models:
            with ctx.autocast():
                masks.append(model(batch["image"]).argmax(1).masked_fill(padding, 255))  # (B, H, W)
        stacked = torch.stack(masks)  # (K, B, H, W)
        scores = stability_scores(stacked, data.num_classes)
        truth = per_image_miou(stacked[-1], batch["mask"], data.num_classes) if truth_known else torch.full_like(scores, float("nan"))
        rows += list(zip(batch["index"].tolist(), scores.tolist(), truth.tolist()))
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    table = torch.full((len(data.unlabelled), 2), float("nan"), dtype=torch.float64)
    for index, score, truth_miou in rows:
        table[index] = torch.tensor([score, truth_miou], dtype=torch.float64)
    return table[:, 0], table[:, 1]


def _nanmean(values: torch.Tensor) -> float:
    return float(torch.nanmean(values)) if values.numel() else float("nan")


@register_stage(StabilitySelectStage)
def run_stability_select(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: StabilitySelectStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    scores, truth = score_images(load_snapshots(Path(job.inputs["snapshots"])), data, job, ctx)
    reliable, unreliable = split_reliable(scores, stage.reliable_fraction)
    reliable_samples = [data.unlabelled[i] for i in reliable.tolist()]
    selection = {
        "stability/score_mean": _nanmean(scores),
        "stability/reliable_count": float(len(reliable)),
        "stability/cutoff": float(scores[reliable[-1]]) if len(reliable) else float("nan"),
        # Mean per-image mIoU of the last snapshot vs ground truth in each part: the gap says how
        # well stability finds the images the model already gets right.
        "stability/reliable_image_miou": _nanmean(truth[reliable]),
        "stability/unreliable_image_miou": _nanmean(truth[unreliable]),
    }
    if ctx.is_main:
        for name, order in (("reliable.txt", reliable), ("unreliable.txt", unreliable)):
            job.output(name).write_text("".join(f"{data.unlabelled[i].id}\n" for i in order.tolist()))
        job.output("stability.json").write_text(json.dumps({s.id: float(v) for s, v in zip(data.unlabelled, scores.tolist())}))
    best, _ = load_checkpoint(Path(job.inputs["model"]))
    return label_and_measure(
        job, ctx, data, best, tta_labeller(ctx, stage.scales, stage.flip, stage.threshold), samples=reliable_samples,
        extra_metrics={k: v for k, v in selection.items() if v == v}, what=f"reliable {len(reliable)}/{len(scores)}",
    )


# --------------------------------------------------------------------------------------------
# st_retrain
# --------------------------------------------------------------------------------------------


def pseudo_labelled(data: StageData, folder: Path) -> list:
    """The unlabelled samples that ``folder`` (a labelling stage's artifact) has a label for."""
    return [sample for sample in data.unlabelled if (folder / f"{sample.id}.png").is_file()]


def strong_pipeline(crop_size: int, scale_range: tuple[float, float], hflip: bool, *, strong_p: float, cutout_p: float) -> A.Compose:
    """Weak (scale, crop, flip) then ST++'s recipe, on image and mask together so the Cutout region
    becomes 255 in the pseudo label (``SegmentationDataset.strong_transform`` would keep the mask)."""
    recipe = st_plus_plus_augmentation(cutout_p=cutout_p)
    recipe.p = strong_p
    return A.Compose([weak_augmentation(crop_size, scale_range=scale_range, hflip=hflip), recipe])


@register_stage(StRetrainStage)
def run_st_retrain(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: StRetrainStage = job.stage  # type: ignore[assignment]
    config = job.pipeline.data
    data = prepare_data(config, job.seed)
    folder = Path(job.inputs["pseudo_labels"])
    samples = pseudo_labelled(data, folder)
    if not samples:
        raise ConfigError(f"stages.{stage.name}: {folder} labels no unlabelled image (reliable_fraction = 0?)")
    network, model_config = initial_model(job, data.num_classes)  # fresh: the authors restart from the initial weights
    transform = strong_pipeline(config.crop_size, config.scale_range, config.hflip, strong_p=stage.strong_p, cutout_p=stage.cutout_p)
    batches, steps = pseudo_labelled_batches(job, ctx, data, stage, samples=samples, transform=transform)
    ctx.log(f"  [{stage.name}] re-training on {len(data.labelled)} labelled + {len(samples)} pseudo-labelled images")
    summary = train_network(job, ctx, data, network, model_config, batches=batches, steps_per_epoch=steps,
                            compute_losses=self_training_terms(stage.pseudo_weight, enet_weights(stage, data, ctx)))
    return {**summary, "pseudo_labelled_images": len(samples)}


# --------------------------------------------------------------------------------------------
# relabel_unreliable
# --------------------------------------------------------------------------------------------


@register_stage(RelabelUnreliableStage)
def run_relabel_unreliable(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: RelabelUnreliableStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    kept_folder = Path(job.inputs["pseudo_labels"])
    kept = {sample.id for sample in pseudo_labelled(data, kept_folder)}
    rest = [sample for sample in data.unlabelled if sample.id not in kept]
    model, _ = load_checkpoint(Path(job.inputs["model"]))
    labeller = tta_labeller(ctx, stage.scales, stage.flip, stage.threshold)
    summary = label_and_measure(job, ctx, data, model, labeller, samples=rest, what=f"unreliable {len(rest)}")
    if ctx.is_main:  # every worker's PNGs are written (label_and_measure's barrier): add the kept labels
        out = job.output(PSEUDO_LABELS_FOLDER)
        for sample_id in kept:
            target = out / f"{sample_id}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept_folder / f"{sample_id}.png", target)
        if "pseudo_label/miou" in summary:
            combined = _combined_quality(data, out)
            log_quality(ctx, combined, step=0, prefix="pseudo_label_all/")
            summary.update({k.replace("pseudo_label/", "pseudo_label_all/", 1): v for k, v in combined.items() if not isinstance(v, dict)})
    return summary


def _combined_quality(data: StageData, folder: Path) -> dict[str, Any]:
    """Quality of the whole folder (kept + new labels) as the final re-training sees it (rank 0)."""
    quality = PseudoLabelQuality(data.num_classes)
    for sample in data.unlabelled:
        pseudo = torch.from_numpy(read_mask(folder / f"{sample.id}.png", data.num_classes, None)).long()
        truth = torch.from_numpy(read_mask(sample.mask, data.num_classes, data.index.label_map)).long()
        quality.update(pseudo, truth)
    return quality_summary(quality, data)
