"""Datasets for selftune: layouts on disk, labelled splits, augmentation and loaders.

``open_dataset(kind, root)`` lists a dataset's samples; ``split_labelled`` picks the labelled
subset of its train split and ``split_selection`` the val images that pick checkpoints (kept out
of the reported val set); ``SegmentationDataset`` + ``make_loader`` turn samples into batches
(``pad=True``, through ``pad_collate``, for images of different sizes).
"""

from __future__ import annotations

from selftune.data.batches import TwoStreamBatch, two_streams
from selftune.data.dataset import SegmentationDataset
from selftune.data.index import IGNORE_INDEX, DatasetIndex, Sample
from selftune.data.io import read_image, read_mask
from selftune.data.layouts import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    available_layouts,
    cityscapes_label_map,
    open_dataset,
    register_layout,
)
from selftune.data.loaders import InfiniteLoader, cycle, make_loader, pad_collate, prefetched
from selftune.data.splits import split_labelled, split_selection
from selftune.data.strong import SAUG_OPS, saug_augmentation, st_plus_plus_augmentation
from selftune.data.transforms import eval_transform, weak_augmentation

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "DatasetIndex",
    "InfiniteLoader",
    "Sample",
    "SegmentationDataset",
    "available_layouts",
    "cityscapes_label_map",
    "cycle",
    "eval_transform",
    "make_loader",
    "open_dataset",
    "pad_collate",
    "prefetched",
    "read_image",
    "read_mask",
    "register_layout",
    "split_labelled",
    "split_selection",
    "SAUG_OPS",
    "saug_augmentation",
    "st_plus_plus_augmentation",
    "TwoStreamBatch",
    "two_streams",
    "weak_augmentation",
]
