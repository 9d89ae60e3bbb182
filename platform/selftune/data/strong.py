"""Strong augmentation for unlabelled images, built on albumentations.

``saug_augmentation(n_ops, magnitude)`` is the SAUG pool of Yuan et al. (seed 003, Figure 1):
RandAugment extended to segmentation — ``n_ops`` photometric operations drawn at random from 17
per image, their strength scaled by ``magnitude`` in [0, 1]. They change only the image, so the
mask stays aligned; geometric augmentation (scale, crop, flip) is the weak pipeline's job, or, for
methods that must move teacher outputs the same way, done in torch on the batch
(``selftune.methods.three_stage``).

``st_plus_plus_augmentation()`` is ST++'s recipe (colour jitter, grayscale, blur, Cutout with the
cut region set to 255 in the mask).
"""

from __future__ import annotations

from typing import Callable

import albumentations as A

from selftune.data.index import IGNORE_INDEX
from selftune.errors import ConfigError


def _between(low: float, high: float, magnitude: float) -> float:
    return low + (high - low) * magnitude


# name -> op at magnitude m in [0, 1] (m = 0 is nearly the identity). Names follow the paper's list.
SAUG_OPS: dict[str, Callable[[float], A.BasicTransform]] = {
    "contrast_gamma": lambda m: A.RandomGamma(gamma_limit=(100 - 60 * m, 100 + 60 * m), p=1),
    "contrast_linear": lambda m: A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.6 * m, p=1),
    "brightness": lambda m: A.RandomBrightnessContrast(brightness_limit=0.5 * m, contrast_limit=0, p=1),
    "brightness_channel": lambda m: A.RGBShift(*(3 * [(-60 * m, 60 * m)]), p=1),
    "equalize": lambda m: A.Equalize(p=1),
    "hsv": lambda m: A.HueSaturationValue(20 * m, 40 * m, 30 * m, p=1),
    "invert_channel": lambda m: A.InvertImg(p=1),
    "blur": lambda m: A.GaussianBlur(sigma_limit=(0.1, _between(0.2, 2.0, m)), p=1),
    "noise_gau": lambda m: A.GaussNoise(std_range=(0.0, _between(0.01, 0.15, m)), p=1),
    "noise_pos": lambda m: A.ISONoise(intensity=(0.1, _between(0.1, 0.8, m)), p=1),
    "channel_shuffle": lambda m: A.ChannelShuffle(p=1),
    "dropout": lambda m: A.PixelDropout(dropout_prob=_between(0.005, 0.1, m), p=1),
    "coarse_dropout": lambda m: A.CoarseDropout(num_holes_range=(1, 1 + int(7 * m)), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=1),
    "multiply": lambda m: A.MultiplicativeNoise(multiplier=(1 - 0.5 * m, 1 + 0.5 * m), per_channel=True, p=1),
    "salt_pepper": lambda m: A.SaltAndPepper(amount=(0.0, _between(0.005, 0.1, m)), p=1),
    "solarize": lambda m: A.Solarize(threshold_range=(1 - 0.5 * m, 1 - 0.5 * m), p=1),
    "jpeg_compression": lambda m: A.ImageCompression(quality_range=(int(_between(95, 20, m)), 100), p=1),
}


def saug_augmentation(
    n_ops: int = 2, magnitude: float = 0.5, *, ops: list[str] | None = None, replace: bool = True
) -> A.Compose:
    """``n_ops`` operations drawn per image from the SAUG pool, applied in pool order.

    ``replace=True`` (the paper's sampling) draws with replacement, so an op may come twice and
    ``n_ops`` may exceed the pool; ``replace=False`` draws ``n_ops`` distinct ops (selftune's
    sampling before issue 14, kept bit-for-bit for runs that must reproduce it).
    """
    names = ops or list(SAUG_OPS)
    unknown = [name for name in names if name not in SAUG_OPS]
    if unknown:
        raise ConfigError(f"strong augmentation op {unknown[0]!r} is unknown; the SAUG pool is: {', '.join(SAUG_OPS)}")
    if replace and n_ops < 0:
        raise ConfigError(f"strong augmentation n_ops must be >= 0, got {n_ops}")
    if not replace and not 0 <= n_ops <= len(names):
        raise ConfigError(f"strong augmentation n_ops must be in 0..{len(names)} without replacement, got {n_ops}")
    if not 0.0 <= magnitude <= 1.0:
        raise ConfigError(f"strong augmentation magnitude must be in [0, 1], got {magnitude}")
    if n_ops == 0:
        return A.Compose([])
    return A.Compose([A.SomeOf([SAUG_OPS[name](magnitude) for name in names], n=n_ops, replace=replace, p=1)])


def st_plus_plus_augmentation(*, cutout_p: float = 0.5) -> A.Compose:
    """ST++: ColorJitter(0.5, 0.5, 0.5, 0.25) p=0.8, grayscale p=0.2, blur σ∈[0.1, 2] p=0.5, and
    Cutout p=0.5 over 2-40 % of the image with random values, the cut pixels ignored (255)."""
    return A.Compose([
        A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=0.8),
        A.ToGray(p=0.2),
        A.GaussianBlur(sigma_limit=(0.1, 2.0), p=0.5),
        A.CoarseDropout(
            num_holes_range=(1, 1), hole_height_range=(0.14, 0.63), hole_width_range=(0.14, 0.63),
            fill="random_uniform", fill_mask=IGNORE_INDEX, p=cutout_p,
        ),
    ])
