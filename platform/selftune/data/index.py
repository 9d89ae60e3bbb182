"""What a dataset is once opened: its samples, splits and class names, with no pixels read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
"""Mask value that marks a pixel as unlabelled (void): losses and metrics skip it."""


@dataclass(frozen=True)
class Sample:
    """One image and, if it has one, its ground-truth mask. ``id`` is unique within a dataset."""

    id: str
    image: Path
    mask: Path | None


@dataclass
class DatasetIndex:
    """The samples of a dataset's train and val splits.

    ``label_map`` is a 256-entry uint8 lookup table applied to raw mask values before they are
    used (Cityscapes labelId -> trainId); ``None`` when masks already hold class indices.
    """

    name: str
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    label_map: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.label_map is not None and (self.label_map.shape != (256,) or self.label_map.dtype != np.uint8):
            raise ValueError(
                f"label_map must be a uint8 array of shape (256,), got {self.label_map.dtype} {self.label_map.shape}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)
