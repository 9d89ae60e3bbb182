"""The data a stage trains and evaluates on: the dataset index, the labelled/unlabelled split and
the loaders. The split is a pure function of (dataset, ``data.labelled``, seed), so the driver and
every worker compute the same one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import albumentations as A
from torch.utils.data import DataLoader, Subset

from selftune.config import DataConfig
from selftune.data import (
    DatasetIndex,
    Sample,
    SegmentationDataset,
    eval_transform,
    make_loader,
    open_dataset,
    split_labelled,
    split_selection,
    weak_augmentation,
)
from selftune.engine.context import WorkerContext


@dataclass(frozen=True)
class StageData:
    index: DatasetIndex
    labelled: list[Sample]
    unlabelled: list[Sample]
    selection: list[Sample] = field(default_factory=list)  # chooses best epochs (select/miou)
    reported: list[Sample] = field(default_factory=list)  # val minus the selection images (val/miou)

    @property
    def selects_on_val(self) -> bool:
        """The papers' protocol: the selection images are the reported ones."""
        return self.selection == self.reported

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.index.classes

    def only_unlabelled(self, samples: Sequence[Sample]) -> StageData:
        """The same data with ``samples`` as the unlabelled set (a labelling stage's subset)."""
        return replace(self, unlabelled=list(samples))


def prepare_data(config: DataConfig, seed: int) -> StageData:
    """Open the dataset (generating the synthetic one on first use) and split its train set."""
    index = open_dataset(config.dataset, config.root, **config.options)
    by_id = {sample.id: sample for sample in index.train}
    with_masks = [sample.id for sample in index.train if sample.mask is not None]
    labelled_ids, unlabelled_ids = split_labelled(
        list(by_id), config.labelled, seed=seed, root=index.root, candidates=with_masks,
    )
    val_by_id = {sample.id: sample for sample in index.val}
    selection_ids, reported_ids = split_selection(list(val_by_id), config.selection, seed=config.selection_seed, root=index.root)
    return StageData(
        index, [by_id[i] for i in labelled_ids], [by_id[i] for i in unlabelled_ids],
        selection=[val_by_id[i] for i in selection_ids], reported=[val_by_id[i] for i in reported_ids],
    )


def has_ground_truth(samples: Sequence[Sample]) -> bool:
    """Whether every sample has a mask (the benchmark datasets' unlabelled images do: quality is measurable)."""
    return all(sample.mask is not None for sample in samples)


def training_loader(
    data: StageData, samples: Sequence[Sample], config: DataConfig, ctx: WorkerContext, *,
    batch_size: int, seed: int, masks: str | Path = "ground_truth",
    transform: A.BasicTransform | A.Compose | None = None, strong_transform: A.Compose | None = None,
) -> DataLoader:
    """Shuffled batches of this worker's shard of ``samples``: weakly augmented (scale, crop, flip)
    unless ``transform`` says otherwise; ``strong_transform`` (image only) adds ``image_strong``.
    ``masks``: ``"ground_truth"``, ``"none"`` or a pseudo-label folder."""
    dataset = SegmentationDataset(
        samples, num_classes=data.num_classes, masks=masks, label_map=data.index.label_map,
        transform=transform if transform is not None else weak_augmentation(config.crop_size, scale_range=config.scale_range, hflip=config.hflip),
        strong_transform=strong_transform,
    )
    return make_loader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=config.loader_workers,
        rank=ctx.rank, world_size=ctx.world_size, seed=seed, drop_last=len(dataset) >= batch_size * ctx.world_size,
    )


def evaluation_loader(
    data: StageData, samples: Sequence[Sample], config: DataConfig, ctx: WorkerContext, *, masks: str = "ground_truth",
    one_pass: bool = False,
) -> DataLoader:
    """Un-augmented batches of this worker's exact shard (every sample seen once across workers,
    unlike DistributedSampler, which pads with repeats and would skew the confusion matrix).
    Images of different sizes are padded per batch (mask 255 there); ``batch["size"]`` keeps each
    image's own (H, W). ``one_pass=True`` (labelling the unlabelled set) bypasses the decode cache:
    those images are read once per stage, and caching them would grow memory with the dataset;
    validation images, read every epoch, keep it."""
    dataset = SegmentationDataset(
        samples, num_classes=data.num_classes, masks=masks, label_map=data.index.label_map, transform=eval_transform(),
        cache=not one_pass,
    )
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    return make_loader(
        shard, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.loader_workers, pad=True,
    )
