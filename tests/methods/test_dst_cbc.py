"""DST-CBC: dynamic loss against hand-computed values, thresholds against the authors' numpy rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selftune.methods import dst_cbc

IGNORE = 255


def _logits_1x2x1x2() -> torch.Tensor:
    # pixel a: scores (2, 0); pixel b: scores (0, 1)
    return torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)  # (B=1, C=2, H=1, W=2)


def test_dynamic_loss_matches_hand_computation():
    logits = _logits_1x2x1x2()
    labels = torch.tensor([[[0, 0]]])  # both pixels labelled class 0
    gamma = 2.0
    p_a = math.exp(2) / (math.exp(2) + math.exp(0))  # softmax of class 0 at pixel a
    p_b = math.exp(0) / (math.exp(0) + math.exp(1))  # softmax of class 0 at pixel b
    expected = (p_a**gamma * -math.log(p_a) + p_b**gamma * -math.log(p_b)) / 2  # / 2 labelled pixels
    loss = dst_cbc.dynamic_self_training_loss(logits, labels, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dynamic_loss_divides_by_labelled_pixels_not_by_weights():
    logits = _logits_1x2x1x2()
    labels = torch.tensor([[[0, IGNORE]]])
    p_a = math.exp(2) / (math.exp(2) + 1)
    expected = p_a**3 * -math.log(p_a) / 1  # one labelled pixel; sum of weights would give -log(p_a)
    loss = dst_cbc.dynamic_self_training_loss(logits, labels, gamma=3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dynamic_weight_is_not_back_propagated():
    logits = torch.tensor([[[[2.0]], [[0.0]]]], requires_grad=True)  # one pixel, scores (2, 0)
    dst_cbc.dynamic_self_training_loss(logits, torch.tensor([[[0]]]), gamma=2.0).backward()
    p = math.exp(2) / (math.exp(2) + 1)
    # d/dz of w * CE with w constant: w * (softmax - onehot) = p^2 * (p - 1, 1 - p)
    expected = torch.tensor([p**2 * (p - 1), p**2 * (1 - p)])
    assert torch.allclose(logits.grad.flatten(), expected.float(), atol=1e-6)


def test_gamma_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0, :3] = IGNORE
    loss = dst_cbc.dynamic_self_training_loss(logits, labels, gamma=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, ignore_index=IGNORE).item(), rel=1e-6)


def test_labelled_images_weigh_one():
    # image 0 pseudo-labelled (weight p^gamma), image 1 ground truth (weight 1); one pixel each
    logits = torch.tensor([[[[1.0]], [[0.0]]], [[[0.0]], [[3.0]]]])  # (B=2, C=2, 1, 1)
    labels = torch.tensor([[[0]], [[0]]])
    gamma = 4.0
    p0 = math.exp(1) / (math.exp(1) + 1)
    p1 = 1 / (1 + math.exp(3))
    expected = (p0**gamma * -math.log(p0) + 1.0 * -math.log(p1)) / 2
    per_image = dst_cbc.dynamic_self_training_loss(logits, labels, gamma, weight_mask=torch.tensor([True, False]))
    per_pixel = dst_cbc.dynamic_self_training_loss(
        logits, labels, gamma, weight_mask=torch.tensor([[[True]], [[False]]])
    )
    assert per_image.item() == pytest.approx(expected, rel=1e-6)
    assert per_pixel.item() == pytest.approx(expected, rel=1e-6)
    everything_pseudo = (p0**gamma * -math.log(p0) + p1**gamma * -math.log(p1)) / 2
    assert dst_cbc.dynamic_self_training_loss(logits, labels, gamma).item() == pytest.approx(everything_pseudo, rel=1e-6)


def test_all_ignored_gives_zero_and_keeps_the_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = dst_cbc.dynamic_self_training_loss(logits, torch.full((1, 2, 2), IGNORE), gamma=9.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dynamic_weights_are_p_to_the_gamma_and_zero_where_ignored():
    weights = dst_cbc.dynamic_weights(_logits_1x2x1x2(), torch.tensor([[[0, IGNORE]]]), gamma=2.0)
    p_a = math.exp(2) / (math.exp(2) + 1)
    assert weights[0, 0].tolist() == pytest.approx([p_a**2, 0.0], rel=1e-6)
    assert not weights.requires_grad


# ----------------------------------------------------------------------------- thresholds


def test_threshold_is_the_int_n_alpha_plus_one_th_largest():
    conf = torch.tensor([0.9, 0.95, 0.8, 0.7, 0.55, 0.6, 0.5])
    pred = torch.tensor([0, 1, 0, 0, 1, 0, 0])
    # class 0: [0.9, 0.8, 0.7, 0.6, 0.5], n = 5, int(5 * 0.4) + 1 = 3 -> 3rd largest = 0.7
    # class 1: [0.95, 0.55], n = 2, int(2 * 0.4) + 1 = 1 -> largest = 0.95; class 2 empty -> inf
    thresholds = dst_cbc.class_balanced_thresholds(conf, pred, num_classes=3, alpha=0.4)
    assert thresholds.tolist() == [pytest.approx(0.7), pytest.approx(0.95), math.inf]


def test_threshold_ties_are_all_kept():
    conf = torch.tensor([0.9, 0.7, 0.7, 0.7, 0.5])
    pred = torch.zeros(5, dtype=torch.long)
    # int(5 * 0.2) + 1 = 2 -> 2nd largest = 0.7, and every pixel tied at 0.7 passes p >= t
    threshold = dst_cbc.class_balanced_thresholds(conf, pred, 1, alpha=0.2)
    assert threshold.item() == pytest.approx(0.7)
    assert int((conf >= threshold).sum()) == 4


def test_alpha_edges_and_sampling():
    conf = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    pred = torch.zeros(6, dtype=torch.long)
    assert dst_cbc.class_balanced_thresholds(conf, pred, 2, alpha=1.0).tolist() == [-math.inf, -math.inf]
    assert dst_cbc.class_balanced_thresholds(conf, pred, 1, alpha=0.0).item() == pytest.approx(0.9)
    # every 2nd value: [0.9, 0.8, 0.7]; int(3 * 0.5) + 1 = 2 -> 0.8
    assert dst_cbc.class_balanced_thresholds(conf, pred, 1, alpha=0.5, sample_every=2).item() == pytest.approx(0.8)


def test_alpha_one_keeps_every_pixel():
    probs = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    confidence, prediction = probs.max(dim=1)
    thresholds = dst_cbc.class_balanced_thresholds(confidence, prediction, 4, alpha=1.0)
    labels = dst_cbc.class_balanced_pseudo_labels(probs, thresholds)
    assert torch.equal(labels, prediction)


def test_empty_class_keeps_nothing_and_does_not_crash():
    conf = torch.tensor([0.9, 0.8])
    pred = torch.tensor([0, 0])
    thresholds = dst_cbc.class_balanced_thresholds(conf, pred, num_classes=2, alpha=0.5)
    assert thresholds[1].item() == math.inf
    empty = dst_cbc.class_balanced_thresholds(torch.empty(0), torch.empty(0, dtype=torch.long), 2, 0.5)
    assert empty.tolist() == [math.inf, math.inf]


@pytest.mark.parametrize("seed", range(6))
def test_fast_thresholds_equal_the_authors_numpy_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = 1 + seed * 3
    probs = torch.softmax(3 * torch.randn(3, num_classes, 40, 50, generator=generator), dim=1)
    confidence, prediction = probs.max(dim=1)  # (3, 40, 50)
    if seed % 2:
        confidence = (confidence * 8).round() / 8  # many exact ties
    if seed == 5:
        confidence = confidence.double()
    alpha = float(torch.rand((), generator=generator))
    for sample_every in (1, 16):
        fast = dst_cbc.class_balanced_thresholds(confidence, prediction, num_classes, alpha, sample_every=sample_every)
        reference = dst_cbc.class_balanced_thresholds_reference(
            confidence.numpy(), prediction.numpy(), num_classes, alpha, sample_every=sample_every
        )
        assert np.array_equal(fast.numpy(), reference), (sample_every, fast, reference)


def test_thresholds_with_negative_scores_and_saturated_ones():
    conf = torch.tensor([1.0, 1.0, 1.0, -2.0, -0.5, 0.25, -3.0, 1.0])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    for alpha in (0.0, 0.3, 0.6, 0.99):
        fast = dst_cbc.class_balanced_thresholds(conf, pred, 2, alpha)
        reference = dst_cbc.class_balanced_thresholds_reference(conf.numpy(), pred.numpy(), 2, alpha, sample_every=1)
        assert np.array_equal(fast.numpy(), reference)


def test_threshold_input_errors():
    conf, pred = torch.rand(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="alpha must lie in"):
        dst_cbc.class_balanced_thresholds(conf, pred, 4, alpha=1.5)
    with pytest.raises(ValueError, match="prediction holds class 3 but classes are 0..2"):
        dst_cbc.class_balanced_thresholds(conf, pred, 3, alpha=0.5)
    with pytest.raises(ValueError, match="same shape"):
        dst_cbc.class_balanced_thresholds(conf, pred[:2], 4, alpha=0.5)


def test_pseudo_labels_use_argmax_then_its_threshold():
    # three pixels, two classes; (B=1, C=2, H=1, W=3)
    probs = torch.tensor([[[[0.8, 0.35, 0.4]], [[0.2, 0.65, 0.6]]]])
    thresholds = torch.tensor([0.3, 0.9])
    labels = dst_cbc.class_balanced_pseudo_labels(probs, thresholds)
    # pixel 0: argmax 0, 0.8 >= 0.3 kept; pixel 1: argmax 1, 0.65 < 0.9 dropped;
    # pixel 2: argmax 1, 0.6 < 0.9 dropped, although p/t would pick class 0 (0.4/0.3 > 0.6/0.9)
    assert labels.tolist() == [[[0, IGNORE, IGNORE]]]
    assert dst_cbc.class_balanced_pseudo_labels(probs, torch.tensor([0.8, 0.6])).tolist() == [[[0, 1, 1]]]
    # global threshold T is strict (eq. 6): 0.8 > 0.8 fails
    strict = dst_cbc.class_balanced_pseudo_labels(probs, torch.tensor([0.0, 0.0]), global_threshold=0.8)
    assert strict.tolist() == [[[IGNORE, IGNORE, IGNORE]]]
    assert dst_cbc.class_balanced_pseudo_labels(probs, torch.tensor([0.0, 0.0]), 0.62).tolist() == [[[0, 1, IGNORE]]]
