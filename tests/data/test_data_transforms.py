from __future__ import annotations

import numpy as np
import pytest

from selftune.data import eval_transform, weak_augmentation
from selftune.errors import ConfigError


def position_coded(height: int = 16, width: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is 8 x column and a mask whose value is the column."""
    columns = np.tile(np.arange(width, dtype=np.uint8), (height, 1))
    image = np.stack([columns * 8, np.zeros_like(columns), np.full_like(columns, 50)], axis=-1)
    return image, columns.copy()


def test_crop_and_flip_keep_image_and_mask_aligned():
    image, mask = position_coded()
    transform = weak_augmentation((8, 12), scale_range=(1.0, 1.0), seed=0)
    flipped = 0
    for _ in range(20):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (8, 12, 3) and out["mask"].shape == (8, 12)
        np.testing.assert_array_equal(out["image"][..., 0] // 8, out["mask"])
        flipped += int(out["mask"][0, 0] > out["mask"][0, -1])
    assert 0 < flipped < 20  # both orientations occurred, and each stayed aligned


def test_rescaling_keeps_alignment_and_masks_exact():
    image, mask = position_coded()
    out = weak_augmentation(32, scale_range=(2.0, 2.0), hflip=False, seed=0)(image=image, mask=mask)
    inside = out["mask"] != 255
    # bilinear image and nearest mask agree to within one column; masks hold only original values
    assert np.abs(out["image"][..., 0][inside].astype(int) // 8 - out["mask"][inside]).max() <= 1
    assert set(np.unique(out["mask"][inside])) <= set(range(24))


def test_scale_range_sets_the_scale_factor():
    image, mask = position_coded(16, 24)
    out = weak_augmentation(64, scale_range=(0.5, 0.5), seed=0)(image=image, mask=mask)
    assert (out["mask"] != 255).sum() == 8 * 12  # halved in both directions, then padded


def test_padding_fills_image_with_zero_and_mask_with_ignore():
    image = np.full((6, 8, 3), 90, dtype=np.uint8)
    mask = np.full((6, 8), 1, dtype=np.uint8)
    out = weak_augmentation(12, scale_range=(1.0, 1.0), seed=0)(image=image, mask=mask)
    padded = out["mask"] == 255
    assert padded.sum() == 12 * 12 - 6 * 8
    assert (out["image"][padded] == 0).all() and (out["image"][~padded] == 90).all()


def test_hflip_false_never_flips():
    image, mask = position_coded()
    transform = weak_augmentation((8, 12), scale_range=(1.0, 1.0), hflip=False, seed=0)
    for _ in range(10):
        row = transform(image=image, mask=mask)["mask"][0]
        assert (np.diff(row.astype(int)) == 1).all()


def test_same_seed_same_augmentation():
    image, mask = position_coded()
    first = weak_augmentation(10, seed=5)(image=image, mask=mask)
    second = weak_augmentation(10, seed=5)(image=image, mask=mask)
    np.testing.assert_array_equal(first["mask"], second["mask"])
    np.testing.assert_array_equal(first["image"], second["image"])


def test_eval_transform_is_identity_or_resize():
    image, mask = position_coded(16, 24)
    same = eval_transform()(image=image, mask=mask)
    np.testing.assert_array_equal(same["image"], image)
    np.testing.assert_array_equal(same["mask"], mask)
    resized = eval_transform((8, 12))(image=image, mask=mask)
    assert resized["image"].shape == (8, 12, 3) and resized["mask"].shape == (8, 12)
    assert set(np.unique(resized["mask"])) <= set(range(24))  # nearest: no blended class ids
    assert eval_transform(5)(image=image, mask=mask)["mask"].shape == (5, 5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"crop_size": 0}, r"crop_size must be a positive int or a \(height, width\) pair of them, got 0"),
    ({"crop_size": (8, 8, 8)}, r"crop_size must be a positive int"),
    ({"crop_size": 8, "scale_range": (2.0, 1.0)}, r"scale_range must satisfy 0 < low <= high, got \(2\.0, 1\.0\)"),
])
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        weak_augmentation(**kwargs)
