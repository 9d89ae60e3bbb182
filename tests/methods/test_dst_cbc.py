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


# ----------------------------------------------------------------------------- labelling at dataset scale


def _probs(generator: torch.Generator, batch: int, classes: int, height: int, width: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(batch, classes, height, width, generator=generator), dim=1)


def test_sample_takes_every_nth_valid_pixel_of_each_image():
    # two 2x3 maps, one class; image 0 is 2x3, image 1 only 1x2 (the rest padding)
    conf = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [[0.7, 0.8, 0.0], [0.0, 0.0, 0.0]]])
    probs = conf[:, None]  # (B=2, C=1, 2, 3): max p = conf, argmax 0
    valid = dst_cbc.valid_pixels(torch.tensor([[2, 3], [1, 2]]), 2, 3)
    assert valid.tolist() == [[[True] * 3] * 2, [[True, True, False], [False] * 3]]
    sample, classes = dst_cbc.sample_confidences(probs, valid, sample_every=2)
    # image 0: 0.1 0.2 0.3 0.4 0.5 0.6 -> 0.1 0.3 0.5; image 1 starts again at its first pixel: 0.7
    # (sampling the concatenation would have given 0.1 0.3 0.5 0.8)
    assert sample.tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7])
    assert classes.tolist() == [0, 0, 0, 0]


def test_sample_is_a_compact_copy_of_float32_and_uint8():
    probs = _probs(torch.Generator().manual_seed(0), 2, 5, 64, 64)
    conf, classes = dst_cbc.sample_confidences(probs, None, sample_every=16)
    assert conf.dtype == torch.float32 and classes.dtype == torch.uint8
    assert conf.numel() == classes.numel() == 2 * 64 * 64 // 16
    # the storage is the sample's own, not the batch's full-resolution map behind a strided view
    assert conf.untyped_storage().nbytes() == conf.numel() * 4
    assert classes.untyped_storage().nbytes() == classes.numel()
    expected_conf, expected_cls = probs.max(dim=1)
    assert torch.equal(conf, expected_conf.reshape(2, -1)[:, ::16].reshape(-1))
    assert torch.equal(classes.long(), expected_cls.reshape(2, -1)[:, ::16].reshape(-1))


def test_sample_equals_the_concatenated_batch_rule_when_images_divide_by_n():
    # 64x64 = 4096 pixels, a multiple of 16: per image and per concatenation pick the same pixels,
    # so the pipeline's thresholds on the synthetic dataset do not move
    probs = _probs(torch.Generator().manual_seed(1), 3, 4, 64, 64)
    confidence, prediction = probs.max(dim=1)
    conf, classes = dst_cbc.sample_confidences(probs, None, sample_every=16)
    assert torch.equal(conf, confidence.reshape(-1)[::16])
    assert torch.equal(classes.long(), prediction.reshape(-1)[::16])


def test_half_precision_confidences_would_move_the_threshold():
    # why the sample stays float32: fp16 rounds 0.9996 to 0.99951 (steps of 2**-11 near 1), so a
    # pixel at 0.99955 would pass the rounded threshold and fail the exact one
    conf = torch.tensor([0.9991, 0.9993, 0.9996, 0.9998])
    exact = dst_cbc.class_balanced_thresholds_from_sample(conf, torch.zeros(4, dtype=torch.uint8), 1, 0.25)
    half = dst_cbc.class_balanced_thresholds_from_sample(conf.half(), torch.zeros(4, dtype=torch.uint8), 1, 0.25)
    pixel = torch.tensor(0.99955)
    assert exact.item() == pytest.approx(0.9996) and bool(pixel < exact)
    assert bool(pixel >= half.float())
    probs = torch.tensor([[[[0.9996]], [[0.0004]]]])
    assert dst_cbc.sample_confidences(probs, None, 1)[0].dtype == torch.float32


def test_sample_thresholds_by_hand():
    conf = torch.tensor([0.9, 0.95, 0.8, 0.7, 0.55, 0.6, 0.5, 0.3])
    classes = torch.tensor([0, 1, 0, 0, 1, 0, 0, 2], dtype=torch.uint8)
    # class 0: n = 5, int(5 * 0.4) + 1 = 3 -> 0.7; class 1: n = 2, int(0.8) + 1 = 1 -> 0.95;
    # class 2: n = 1, 1 * 0.4 < 1 -> too few to rank: -inf (authors: keep all); class 3 empty
    strict = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 4, 0.4, keep_small_classes=False)
    assert strict.tolist() == [pytest.approx(0.7), pytest.approx(0.95), pytest.approx(0.3), math.inf]
    authors = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 4, 0.4)
    # class 1: 2 * 0.4 = 0.8 < 1 as well; class 3: 0 * 0.4 < 1
    assert authors.tolist() == [pytest.approx(0.7), -math.inf, -math.inf, -math.inf]
    # alpha = 0 asks for nothing: the top value and its ties even for a small class
    assert dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 4, 0.0).tolist()[:3] == [
        pytest.approx(0.9), pytest.approx(0.95), pytest.approx(0.3)]
    assert dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 4, 1.0).tolist() == [-math.inf] * 4


@pytest.mark.parametrize("size", [1, 13, 4096, 300_001, 600_000])
def test_sample_thresholds_equal_the_radix_path_bit_for_bit(size):
    # the pipeline's call today: class_balanced_thresholds(conf, pred, C, alpha, sample_every=1)
    generator = torch.Generator().manual_seed(size)
    num_classes = 1 + size % 21
    conf = torch.rand(size, generator=generator)
    conf[torch.rand(size, generator=generator) < 0.1] = 1.0  # saturated softmax
    conf[::5] = (conf[::5] * 16).round() / 16  # exact ties
    if size > 1:
        conf[1] = -0.0  # a signed zero keeps its sign bit
    classes = torch.randint(0, num_classes, (size,), generator=generator).to(torch.uint8)
    pieces = list(torch.split(torch.arange(size), 4097))  # as one piece per batch
    for alpha in (0.0, 0.2, 0.6, 0.999):
        old = dst_cbc.class_balanced_thresholds(conf, classes.long(), num_classes, alpha, sample_every=1)
        new = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, num_classes, alpha, keep_small_classes=False)
        streamed = dst_cbc.class_balanced_thresholds_from_sample(
            [conf[i] for i in pieces], [classes[i] for i in pieces], num_classes, alpha, keep_small_classes=False
        )
        assert torch.equal(old.view(torch.int32), new.view(torch.int32)), (alpha, old, new)
        assert torch.equal(new.view(torch.int32), streamed.view(torch.int32))
        reference = dst_cbc.class_balanced_thresholds_reference(conf.numpy(), classes.numpy(), num_classes, alpha, sample_every=1)
        assert np.array_equal(new.numpy(), reference)


def test_sample_thresholds_keep_small_classes_only_where_n_alpha_is_below_one():
    generator = torch.Generator().manual_seed(3)
    conf = torch.rand(5000, generator=generator)
    classes = torch.randint(0, 3, (5000,), generator=generator).to(torch.uint8)
    classes[:4] = 3  # class 3: n = 4, 4 * 0.2 < 1; class 4: empty
    strict = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 5, 0.2, keep_small_classes=False)
    authors = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 5, 0.2)
    assert torch.equal(authors[:3], strict[:3])
    assert authors[3:].tolist() == [-math.inf, -math.inf] and strict[4].item() == math.inf


def test_sample_thresholds_half_and_input_errors():
    conf = torch.tensor([0.5, 0.75, 0.875, 1.0]).half()
    classes = torch.tensor([0, 0, 1, 1])
    thresholds = dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 2, 0.5, keep_small_classes=False)
    assert thresholds.dtype == torch.float16 and thresholds.tolist() == [0.5, 0.875]
    with pytest.raises(ValueError, match="prediction holds class 2 but classes are 0..1"):
        dst_cbc.class_balanced_thresholds_from_sample(conf, classes + 1, 2, 0.5)
    with pytest.raises(ValueError, match="holds NaN"):
        dst_cbc.class_balanced_thresholds_from_sample(torch.tensor([float("nan")]), torch.tensor([0]), 1, 0.5)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dst_cbc.class_balanced_thresholds_from_sample(conf.double(), classes, 2, 0.5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        dst_cbc.class_balanced_thresholds_from_sample(conf, classes, 2, -0.1)
    empty = dst_cbc.class_balanced_thresholds_from_sample([], [], 2, 0.5, keep_small_classes=False)
    assert empty.tolist() == [math.inf, math.inf]
