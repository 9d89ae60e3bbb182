"""Joint image/mask augmentation, built from albumentations.

Every transform here moves image and mask together: the image is resampled bilinearly, the mask
with nearest neighbour (class ids must never be blended), and padding fills masks with 255 so
padded pixels are ignored by losses and metrics.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from selftune.data.index import IGNORE_INDEX
from selftune.errors import ConfigError


def _size(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair."""
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ConfigError(f"{what} must be a positive int or a (height, width) pair of them, got {size!r}")
    return pair  # type: ignore[return-value]


def weak_augmentation(
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    *,
    seed: int | None = None,
) -> A.Compose:
    """Random rescale by a factor in ``scale_range``, pad to the crop (image 0, mask 255), random
    crop of ``crop_size`` (int or (h, w)), then a horizontal flip with probability 0.5.

    ``seed`` makes the sequence of augmentations reproducible; ``SegmentationDataset`` reseeds it
    per DataLoader worker so workers do not repeat each other.
    """
    height, width = _size(crop_size, "crop_size")
    low, high = scale_range
    if not 0 < low <= high:
        raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    steps: list[A.BasicTransform] = [
        # RandomScale draws the factor from 1 + scale_limit, hence the shift by one.
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=height, width=width),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    return seeded(A.Compose(steps), seed)


def eval_transform(size: int | tuple[int, int] | None = None) -> A.Compose:
    """Identity, or a resize to ``size`` (int: square, or (h, w)); bilinear image, nearest mask."""
    if size is None:
        return A.Compose([])
    height, width = _size(size, "size")
    return A.Compose([
        A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
    ])


def seeded(transform: A.Compose, seed: int | None) -> A.Compose:
    """Give ``transform`` one shared random stream seeded with ``seed`` (``None``: leave as is).

    One stream for all steps: ``Compose(seed=...)`` seeds every step with the same value, which
    correlates their draws (e.g. the flip decision with the scale factor).
    """
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform
