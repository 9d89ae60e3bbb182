"""ST++: stability scores (eq. 4) by hand and the selection of the reliable images."""

from __future__ import annotations

import math

import pytest
import torch

from selftune.methods import st_plus_plus

IGNORE = 255


def test_identical_masks_are_perfectly_stable():
    masks = torch.randint(0, 5, (1, 3, 4, 6), generator=torch.Generator().manual_seed(0)).expand(3, 3, 4, 6)
    assert st_plus_plus.stability_scores(masks).tolist() == [1.0, 1.0, 1.0]


def test_stability_by_hand():
    last = torch.tensor([[[0, 0, 1, 1]]])  # M_K, the reference
    first = torch.tensor([[[0, 1, 1, 1]]])  # class 0: IoU 1/2; class 1: IoU 2/3
    middle = torch.tensor([[[2, 2, 2, 2]]])  # every class IoU 0
    scores = st_plus_plus.stability_scores(torch.stack([first, middle, last]))
    assert scores.item() == pytest.approx(((1 / 2 + 2 / 3) / 2 + 0.0) / 2)


def test_classes_absent_from_both_masks_are_skipped():
    same = torch.zeros(1, 1, 4, dtype=torch.long)
    # with 3 classes, classes 1 and 2 appear in neither mask: mIoU is 1, not 1/3
    assert st_plus_plus.stability_scores(torch.stack([same, same]), num_classes=3).item() == 1.0
    ignored = torch.tensor([[[0, IGNORE, 1, 1]]])
    other = torch.tensor([[[0, 0, 1, 0]]])
    # the ignored pixel drops out: class 0 IoU 1/2 (px0 both, px3 only in other), class 1 1/2
    assert st_plus_plus.per_image_miou(other, ignored).item() == pytest.approx(0.5)
    assert math.isnan(st_plus_plus.per_image_miou(torch.full((1, 1, 2), IGNORE), torch.zeros(1, 1, 2, dtype=torch.long)).item())


def test_select_and_split_reliable():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9, float("nan")])
    assert st_plus_plus.select_reliable(scores, 0.6).tolist() == [1, 3, 2]  # ties keep order
    reliable, unreliable = st_plus_plus.split_reliable(scores, 0.5)
    assert reliable.tolist() == [1, 3] and unreliable.tolist() == [2, 0, 4]  # NaN last
    assert st_plus_plus.select_reliable(scores, 0.0).tolist() == []
    with pytest.raises(ValueError, match="fraction must lie in"):
        st_plus_plus.select_reliable(scores, 1.5)
    with pytest.raises(ValueError, match="K >= 2"):
        st_plus_plus.stability_scores(torch.zeros(1, 2, 3, 3, dtype=torch.long))
