"""Pictures logged as MLflow artifacts: pseudo labels next to ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), so class colours match what people know."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def colourise(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ignored pixels white."""
    colours = palette(num_classes)
    out = colours[np.clip(mask, 0, num_classes - 1)]
    out[mask == ignore_index] = IGNORE_COLOUR
    return out


def save_overlay(
    path: Path, image: np.ndarray, panels: Sequence[np.ndarray], num_classes: int, *, scale: int = 1,
) -> Path:
    """One PNG: the RGB image, then each mask panel (e.g. ground truth, pseudo label) side by side."""
    strips = [image] + [colourise(mask, num_classes) for mask in panels]
    picture = np.concatenate(strips, axis=1)
    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(picture).save(path)
    return path
