"""Pseudo-label quality (auxnet tables 3-5) on a hand-worked example."""

from __future__ import annotations

import math

import pytest
import torch

from selftune.metrics import PseudoLabelQuality

NOT_KEPT = 255
# 3 classes. Ground truth has one ignored pixel (255), which counts nowhere even though its pseudo
# label is kept.
GROUND_TRUTH = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PSEUDO = torch.tensor([[0, NOT_KEPT, 1, 0], [NOT_KEPT, NOT_KEPT, 1, NOT_KEPT]])
# valid pixels: 7 (class 0: 2, class 1: 3, class 2: 2); kept among them: (gt 0, p 0) (gt 1, p 1) (gt 1, p 0)
#   kept_fraction  = 3 / 7
#   class coverage = mean(class 0: 1/2, class 1: 2/3, class 2: 0/2) = 7/18
#   kept matrix: gt0 -> [1, 0, 0], gt1 -> [1, 1, 0], gt2 -> [0, 0, 0]
#   IoU class 0 = 1 / (1 + 2 - 1) = 1/2, class 1 = 1 / (2 + 1 - 1) = 1/2, class 2 = 0/0 -> NaN
#   mIoU (nan-mean) = 1/2; pixel accuracy over kept = 2/3


def test_hand_worked_example():
    quality = PseudoLabelQuality(3)
    quality.update(PSEUDO, GROUND_TRUTH)
    result = quality.compute()
    assert result["kept_fraction"] == pytest.approx(3 / 7)
    assert result["class_coverage"] == pytest.approx(7 / 18)
    assert result["per_class_coverage"] == pytest.approx([1 / 2, 2 / 3, 0.0])
    assert result["miou"] == pytest.approx(1 / 2)
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)
    assert result["per_class_iou"][:2] == pytest.approx([1 / 2, 1 / 2]) and math.isnan(result["per_class_iou"][2])
    assert (result["num_pixels"], result["num_kept_pixels"]) == (7, 3)


def test_batches_accumulate_like_one_batch():
    quality = PseudoLabelQuality(3)
    for row in range(2):
        quality.update(PSEUDO[row:row + 1], GROUND_TRUTH[row:row + 1])
    assert quality.compute()["class_coverage"] == pytest.approx(7 / 18)
    assert quality.compute()["num_pixels"] == 7


def test_everything_kept_equals_the_plain_confusion_matrix():
    quality = PseudoLabelQuality(2)
    quality.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    result = quality.compute()
    # class 0: TP 2, row 3, col 2 -> 2/3;  class 1: TP 1, row 1, col 2 -> 1/2
    assert result["per_class_iou"] == pytest.approx([2 / 3, 1 / 2])
    assert (result["kept_fraction"], result["class_coverage"]) == (1.0, 1.0)


def test_per_class_coverage_is_nan_for_a_class_without_ground_truth():
    quality = PseudoLabelQuality(3)
    # class 0: 3 pixels, 1 kept; class 1: 1 pixel, kept; class 2: never in the ground truth
    quality.update(torch.tensor([0, NOT_KEPT, NOT_KEPT, 2]), torch.tensor([0, 0, 0, 1]))
    coverage = quality.compute()["per_class_coverage"]
    assert coverage[:2] == pytest.approx([1 / 3, 1.0]) and math.isnan(coverage[2])
    assert quality.compute()["class_coverage"] == pytest.approx((1 / 3 + 1.0) / 2)


def test_nothing_seen_gives_nan_not_an_error():
    result = PseudoLabelQuality(3).compute()
    assert all(math.isnan(result[key]) for key in ("miou", "kept_fraction", "class_coverage"))
    assert result["num_pixels"] == 0


def test_out_of_range_ground_truth_raises():
    with pytest.raises(ValueError, match=r"ground truth holds class 5 but classes are 0\.\.2"):
        PseudoLabelQuality(3).update(torch.tensor([NOT_KEPT]), torch.tensor([5]))


def test_reset_clears():
    quality = PseudoLabelQuality(3)
    quality.update(PSEUDO, GROUND_TRUTH)
    quality.reset()
    assert quality.compute()["num_pixels"] == 0
