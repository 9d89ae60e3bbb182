"""Strong augmentation: every SAUG op keeps the mask, the pool draws n ops, ST++'s Cutout ignores
the cut pixels, and the dataset's strong view shares the weak view's geometry."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from selftune.data import SegmentationDataset, saug_augmentation, st_plus_plus_augmentation, SAUG_OPS
from selftune.data.index import Sample
from selftune.data.transforms import seeded
from selftune.errors import ConfigError


@pytest.fixture
def image_and_mask():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), rng.integers(0, 4, (32, 32), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(SAUG_OPS))
def test_every_saug_op_changes_only_the_image(name, image_and_mask):
    image, mask = image_and_mask
    out = saug_augmentation(1, 1.0, ops=[name])(image=image, mask=mask)
    assert out["image"].shape == image.shape and out["image"].dtype == np.uint8
    assert np.array_equal(out["mask"], mask)


def test_zero_magnitude_zero_ops_is_the_identity(image_and_mask):
    image, mask = image_and_mask
    assert np.array_equal(saug_augmentation(0, 0.5)(image=image, mask=mask)["image"], image)


def test_the_pool_draws_n_ops_with_replacement_by_default():
    some_of = saug_augmentation(3, 0.5).transforms[0]
    assert some_of.n == 3 and len(some_of.transforms) == len(SAUG_OPS) and some_of.replace is True
    assert saug_augmentation(3, 0.5, replace=False).transforms[0].replace is False
    assert saug_augmentation(20, 0.5).transforms[0].n == 20  # more draws than ops: fine with replacement


def _outcomes(replace: bool, image) -> list[str]:
    """Which of invert / equalize / both / neither each of 40 seeded draws of 2 ops amounts to."""
    transform = seeded(saug_augmentation(2, 0.5, ops=["invert_channel", "equalize"], replace=replace), seed=3)
    inverted = 255 - image
    results = {"neither": image, "equalize": cv2.equalizeHist(image), "both": cv2.equalizeHist(inverted)}
    names = []
    for _ in range(40):
        out = transform(image=image)["image"]
        names.append(next((name for name, value in results.items() if np.array_equal(out, value)), "other"))
    return names


def test_with_replacement_an_op_can_come_twice():
    # A 1-channel ramp: invert twice is the identity, equalize twice is equalize.
    image = np.tile(np.arange(0, 200, 4, dtype=np.uint8), (8, 1))
    with_replacement = _outcomes(True, image)
    assert {"neither", "equalize", "both"} <= set(with_replacement) and "other" not in with_replacement
    assert set(_outcomes(False, image)) == {"both"}  # always the two distinct ops, in pool order


def test_without_replacement_is_the_former_pipeline_bit_for_bit(image_and_mask):
    image, mask = image_and_mask
    former = A.Compose([A.SomeOf([SAUG_OPS[name](0.7) for name in SAUG_OPS], n=3, replace=False, p=1)])
    now = saug_augmentation(3, 0.7, replace=False)
    seeded(former, seed=11), seeded(now, seed=11)
    for _ in range(5):
        assert np.array_equal(former(image=image, mask=mask)["image"], now(image=image, mask=mask)["image"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_ops": 99, "replace": False}, "n_ops must be in 0..17 without replacement"),
    ({"n_ops": -1}, "n_ops must be >= 0"),
    ({"magnitude": 1.5}, r"magnitude must be in \[0, 1\]"),
    ({"ops": ["warp_drive"]}, "op 'warp_drive' is unknown"),
])
def test_bad_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        saug_augmentation(**{"n_ops": 2, "magnitude": 0.5, **kwargs})


def test_st_plus_plus_cutout_sets_the_cut_pixels_to_ignore(image_and_mask):
    image, mask = image_and_mask
    out = st_plus_plus_augmentation(cutout_p=1.0)(image=image, mask=mask)
    cut = out["mask"] == 255
    assert 0.01 < cut.mean() < 0.5
    assert np.array_equal(out["mask"][~cut], mask[~cut])


def test_dataset_strong_view_is_the_same_image_photometrically_changed(tmp_path, image_and_mask):
    from PIL import Image

    image, mask = image_and_mask
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    dataset = SegmentationDataset(
        [Sample("a", tmp_path / "a.png", tmp_path / "m.png")], num_classes=4, transform=None,
        strong_transform=saug_augmentation(1, 1.0, ops=["invert_channel"]),
    )
    item = dataset[0]
    # ImageNet-normalised x and inverted 255 - x: un-normalise both and they sum to 255.
    mean = np.array([0.485, 0.456, 0.406])[:, None, None] * 255
    std = np.array([0.229, 0.224, 0.225])[:, None, None] * 255
    weak = item["image"].numpy() * std + mean
    strong = item["image_strong"].numpy() * std + mean
    assert np.allclose(weak + strong, 255, atol=1e-2)
    assert np.array_equal(item["mask"].numpy(), mask)
