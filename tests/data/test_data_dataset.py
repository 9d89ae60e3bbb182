from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selftune.data import Sample, SegmentationDataset, cityscapes_label_map, open_dataset, weak_augmentation
from selftune.errors import ConfigError, DataError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture
def samples(tmp_path, png) -> list[Sample]:
    """Two 6x8 samples whose image values and masks are known exactly."""
    out = []
    for k in range(2):
        image = np.full((6, 8, 3), (10 * k, 100, 200), dtype=np.uint8)
        mask = np.full((6, 8), k, dtype=np.uint8)
        mask[:, -1] = 255
        image_path, mask_path = png(tmp_path / "img" / f"s{k}.png", image), png(tmp_path / "gt" / f"s{k}.png", mask)
        out.append(Sample(f"s{k}", image_path, mask_path))
    return out


def test_ground_truth_items_are_normalised_tensors_with_their_masks(samples):
    dataset = SegmentationDataset(samples, num_classes=3, transform=None)
    assert len(dataset) == 2
    item = dataset[1]
    assert set(item) == {"image", "mask", "valid", "size", "id", "index"}
    assert item["id"] == "s1" and item["index"] == 1
    assert item["size"].dtype == torch.int64 and item["size"].tolist() == [6, 8]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 6, 8)
    expected = (torch.tensor([10.0, 100.0, 200.0]).view(3, 1, 1) / 255 - MEAN) / STD
    # (torch.testing.assert_close would cost seconds of lazy imports on its first call)
    assert torch.allclose(item["image"], expected.expand(3, 6, 8), atol=1e-5, rtol=0)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (6, 8)
    assert (item["mask"][:, :-1] == 1).all() and (item["mask"][:, -1] == 255).all()
    assert item["valid"].dtype == torch.bool and item["valid"].all()


def test_ground_truth_applies_the_label_map(tmp_path, png):
    image = png(tmp_path / "i.png", np.zeros((2, 3, 3), dtype=np.uint8))
    mask = png(tmp_path / "m.png", np.array([[7, 26, 33], [0, 8, 24]], dtype=np.uint8))
    dataset = SegmentationDataset([Sample("x", image, mask)], num_classes=19, transform=None,
                                  label_map=cityscapes_label_map())
    assert dataset[0]["mask"].tolist() == [[0, 13, 18], [255, 1, 11]]


def test_none_mode_opens_no_mask_file(samples, monkeypatch):
    unlabelled = [Sample(s.id, s.image, Path("/nonexistent/mask.png")) for s in samples]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path)) or real_open(path, *a, **k))
    dataset = SegmentationDataset(unlabelled, num_classes=3, transform=weak_augmentation(4), masks="none")
    item = dataset[0]
    assert opened == [samples[0].image]
    assert item["mask"].shape == (4, 4) and (item["mask"] == 255).all()


def test_pseudo_label_folder_is_read_by_id_without_label_map(samples, tmp_path, png):
    pseudo = tmp_path / "pseudo"
    png(pseudo / "s0.png", np.full((6, 8), 2, dtype=np.uint8))
    png(pseudo / "s1.png", np.full((6, 8), 1, dtype=np.uint8))
    # a label map that would send every value to 255 shows it is not applied to pseudo labels
    dataset = SegmentationDataset(samples, num_classes=3, transform=None, masks=pseudo,
                                  label_map=np.full(256, 255, dtype=np.uint8))
    assert (dataset[0]["mask"] == 2).all() and (dataset[1]["mask"] == 1).all()


def test_pseudo_label_values_are_validated(samples, tmp_path, png):
    png(tmp_path / "pseudo" / "s0.png", np.full((6, 8), 5, dtype=np.uint8))
    dataset = SegmentationDataset(samples, num_classes=3, transform=None, masks=tmp_path / "pseudo")
    with pytest.raises(DataError, match=r"pseudo/s0\.png holds values 5; valid values are 0\.\.2 or 255"):
        dataset[0]


def test_unknown_masks_mode_is_a_config_error(samples):
    message = r"masks='groundtruth' is neither 'ground_truth', 'none' nor an existing folder"
    with pytest.raises(ConfigError, match=message):
        SegmentationDataset(samples, num_classes=3, transform=None, masks="groundtruth")


def test_ground_truth_mode_needs_masks(samples):
    with pytest.raises(DataError, match=r"sample 's0' .* has no ground-truth mask; use masks='none'"):
        SegmentationDataset([Sample("s0", samples[0].image, None)], num_classes=3, transform=None)


def test_unmasked_folder_sample_needs_masks_none(tmp_path, make_folder):
    index = open_dataset("folder", make_folder(tmp_path / "d", train=["t0", "t1"], val=["v0"], unmasked=("t1",)))
    with pytest.raises(DataError, match=r"^sample 't1' \(.*t1\.png\) has no ground-truth mask; use masks='none'") as err:
        SegmentationDataset(index.train, num_classes=3, transform=None, masks="ground_truth")
    assert "\n" not in str(err.value)
    item = SegmentationDataset(index.train, num_classes=3, transform=None, masks="none")[1]
    assert item["id"] == "t1" and (item["mask"] == 255).all() and item["size"].tolist() == [12, 16]


def test_mask_of_another_size_is_rejected(samples, tmp_path, png):
    small = png(tmp_path / "small.png", np.zeros((3, 3), dtype=np.uint8))
    dataset = SegmentationDataset([Sample("s0", samples[0].image, small)], num_classes=3, transform=None)
    with pytest.raises(DataError, match=r"mask .*small\.png is 3x3 but image .*s0\.png is 6x8"):
        dataset[0]


def test_augmented_items_mark_padding_invalid_and_ignored(samples):
    dataset = SegmentationDataset(samples, num_classes=3, transform=weak_augmentation(10, scale_range=(1.0, 1.0)))
    item = dataset[0]
    assert item["image"].shape == (3, 10, 10) and item["mask"].shape == (10, 10)
    assert item["valid"].sum() == 6 * 8  # the whole image, nothing of the padding
    assert (item["mask"][~item["valid"]] == 255).all()
    assert (item["mask"][item["valid"]] != 255).sum() == 6 * 7  # the image's own labelled pixels
