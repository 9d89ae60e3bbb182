"""Auxiliary confidence network: class weights, eq. 1 by hand, T_aux selection."""

from __future__ import annotations

import math

import pytest
import torch

from selftune.methods import auxnet

IGNORE = 255


def _log_sigmoid(z: float) -> float:
    return -math.log(1 + math.exp(-z))


def test_class_weights_by_hand():
    weights = auxnet.class_weights(torch.tensor([0.5, 0.0, 1.0]), c=1.04)
    assert weights.tolist() == pytest.approx([1 / math.log(1.54), 1 / math.log(1.04), 1 / math.log(2.04)])
    with pytest.raises(ValueError, match="c must be > 1"):
        auxnet.class_weights(torch.tensor([0.5]), c=1.0)


def test_class_probability_skips_ignored_pixels():
    labels = torch.tensor([[[0, 0], [1, IGNORE]]])
    assert auxnet.class_probability(labels, 3).tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_positive_weight_is_negatives_over_positives_per_ground_truth_class():
    correct = torch.tensor([[[True, True, False, False, True]]])
    target = torch.tensor([[[0, 0, 0, 1, IGNORE]]])
    # class 0: 2 positives, 1 negative -> 1/2; class 1: no positive -> 0; class 2 absent -> 0
    assert auxnet.positive_weights(correct, target, 3).tolist() == pytest.approx([0.5, 0.0, 0.0])


def test_auxiliary_loss_eq1_by_hand():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 1.0, 3.0]]])  # (B=1, H=1, W=5)
    correct = torch.tensor([[[True, True, False, False, True]]])
    target = torch.tensor([[[0, 0, 0, 1, IGNORE]]])  # ground-truth classes; the last pixel unlabelled
    frequency = torch.tensor([0.75, 0.25])
    w0, w1 = 1 / math.log(1.04 + 0.75), 1 / math.log(1.04 + 0.25)
    gamma0 = 1 / 2  # class 0: one negative, two positives
    per_pixel = [
        -w0 * gamma0 * _log_sigmoid(2.0),  # positive: W * gamma * log a
        -w0 * gamma0 * _log_sigmoid(-1.0),
        -w0 * _log_sigmoid(-0.5),  # negative: W * log(1 - a), no gamma
        -w1 * _log_sigmoid(-1.0),
    ]
    loss = auxnet.auxiliary_confidence_loss(logits[:, None], correct, target, frequency, c=1.04)
    assert loss.item() == pytest.approx(sum(per_pixel) / 4, rel=1e-6)
    total = auxnet.auxiliary_confidence_loss(logits, correct, target, frequency, reduction="sum")
    assert total.item() == pytest.approx(sum(per_pixel), rel=1e-6)
    # an explicit gamma (e.g. counted over the whole labelled set) replaces the batch's
    given = auxnet.auxiliary_confidence_loss(logits, correct, target, frequency, gamma=torch.tensor([1.0, 1.0]))
    per_pixel_given = [-w0 * _log_sigmoid(2.0), -w0 * _log_sigmoid(-1.0)] + per_pixel[2:]
    assert given.item() == pytest.approx(sum(per_pixel_given) / 4, rel=1e-6)


def test_auxiliary_loss_without_labelled_pixels_is_zero():
    logits = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = auxnet.auxiliary_confidence_loss(
        logits, torch.ones(1, 2, 2, dtype=torch.bool), torch.full((1, 2, 2), IGNORE), torch.tensor([0.5, 0.5])
    )
    assert loss.item() == 0.0
    loss.backward()


def test_correctness_target_and_confident_pseudo_labels():
    prediction = torch.tensor([[[1, 2, 0, 2]]])
    ground_truth = torch.tensor([[[1, 0, 0, IGNORE]]])
    assert auxnet.correctness_target(prediction, ground_truth).tolist() == [[[True, False, True, False]]]
    confidence = torch.tensor([[[[0.95, 0.9, 0.5, 0.89]]]])  # (B, 1, H, W)
    labels = auxnet.confident_pseudo_labels(prediction, confidence, t_aux=0.9)
    assert labels.tolist() == [[[1, 2, IGNORE, IGNORE]]]  # >= T_aux kept
    assert torch.equal(auxnet.confident_pseudo_labels(prediction, confidence[:, 0], 0.0), prediction)


def test_enet_class_weights_from_masks_by_hand():
    # 8 counted pixels: class 0 x4, class 1 x3, class 2 x1, class 3 never; two 255 pixels ignored.
    masks = [torch.tensor([[0, 0, 1, 255]]), torch.tensor([[0, 0, 1, 1, 2, 255]])]
    weights = auxnet.enet_class_weights(masks, 4)  # c = 1.1, seed 004 §4.2
    expected = [1 / math.log(1.1 + 4 / 8), 1 / math.log(1.1 + 3 / 8), 1 / math.log(1.1 + 1 / 8), 1 / math.log(1.1)]
    assert weights.tolist() == pytest.approx(expected)  # [2.128, 2.572, 4.930, 10.49]
    # the same from pixel counts, and from one stacked tensor
    assert auxnet.enet_class_weights(torch.tensor([4, 3, 1, 0]), 4).tolist() == pytest.approx(expected)
    assert auxnet.enet_class_weights(torch.tensor([[0, 0, 1, 255], [0, 0, 1, 1]]), 3, c=1.02).tolist() == pytest.approx(
        [1 / math.log(1.02 + 4 / 7), 1 / math.log(1.02 + 3 / 7), 1 / math.log(1.02)]
    )


def test_enet_class_weights_refuse_bad_input():
    with pytest.raises(ValueError, match="pixel counts"):
        auxnet.enet_class_weights(torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="no labelled pixel"):
        auxnet.enet_class_weights([torch.full((2, 2), 255)], 3)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        auxnet.enet_class_weights([torch.tensor([0, 5])], 3)
