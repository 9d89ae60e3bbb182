"""Shared pieces: the EMA teacher, U2PL's momentum warm-up, masked cross-entropy, label resizing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selftune.methods import common

IGNORE = 255


def _pair() -> tuple[nn.Module, nn.Module]:
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    teacher = copy.deepcopy(student)
    for tensor in teacher.state_dict().values():
        tensor.zero_() if tensor.is_floating_point() else tensor.fill_(3)
    for tensor in student.state_dict().values():
        tensor.fill_(1.0) if tensor.is_floating_point() else tensor.fill_(7)
    return teacher, student


def test_ema_moves_every_float_entry_towards_the_student():
    teacher, student = _pair()
    common.ema_update(teacher, student, decay=0.9)
    state = teacher.state_dict()
    # 0.9 * 0 + 0.1 * 1 for weights, biases and the BN running mean / var alike
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(state[key], torch.full_like(state[key], 0.1)), key
    assert state["1.num_batches_tracked"].item() == 7  # integers are copied
    common.ema_update(teacher, student, decay=0.9)
    assert torch.allclose(teacher.state_dict()["0.weight"], torch.full((2, 1, 1, 1), 0.9 * 0.1 + 0.1))


def test_ema_parameters_only_leaves_buffers_alone():
    teacher, student = _pair()
    common.ema_update(teacher, student, decay=0.75, parameters_only=True)
    state = teacher.state_dict()
    assert torch.allclose(state["0.weight"], torch.full_like(state["0.weight"], 0.25))
    assert torch.equal(state["1.running_mean"], torch.zeros(2))
    assert state["1.num_batches_tracked"].item() == 3


def test_ema_decay_edges_and_errors():
    teacher, student = _pair()
    common.ema_update(teacher, student, decay=0.0)  # decay 0: the teacher becomes the student
    assert torch.equal(teacher.state_dict()["1.running_var"], torch.ones(2))
    with pytest.raises(ValueError, match="decay must lie in"):
        common.ema_update(teacher, student, decay=1.5)
    with pytest.raises(ValueError, match="differ in keys"):
        common.ema_update(nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1, bias=False), 0.5)


def test_u2pl_momentum_warm_up():
    assert [common.ema_decay(step, 0.99) for step in (0, 1, 3, 9)] == pytest.approx([0.0, 0.5, 0.75, 0.9])
    assert common.ema_decay(10_000, 0.99) == 0.99


def test_masked_cross_entropy():
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([[[0, 1], [IGNORE, 2]], [[2, 2], [1, IGNORE]]])
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert common.masked_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    zero = common.masked_cross_entropy(logits, torch.full_like(labels, IGNORE))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_resize_labels_is_nearest():
    labels = torch.tensor([[[0, 1], [2, IGNORE]]])
    assert common.resize_labels(labels, (4, 4)).tolist() == [
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, IGNORE, IGNORE], [2, 2, IGNORE, IGNORE]]
    ]
    big = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(common.resize_labels(big, (2, 2)), labels)


def test_class_weighted_cross_entropy_by_hand():
    # Two pixels, uniform logits over 2 classes: CE = ln 2 each. Targets 0 and 1, a third ignored.
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)
    target = torch.tensor([[[0, 1, IGNORE]]])
    weights = torch.tensor([1.0, 3.0])
    loss = common.class_weighted_cross_entropy(logits, target, weights)
    # (1 * ln2 + 3 * ln2) / (1 + 3) = ln 2; unequal CEs show the weighting:
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    skewed = torch.tensor([[[[2.0]], [[0.0]]]]).expand(1, 2, 1, 2).clone()  # pixel CE: class 0 small, class 1 large
    target2 = torch.tensor([[[0, 1]]])
    ce = F.cross_entropy(skewed, target2, reduction="none")[0, 0]
    expected = (1.0 * ce[0] + 3.0 * ce[1]) / 4.0
    assert common.class_weighted_cross_entropy(skewed, target2, weights).item() == pytest.approx(expected.item())
    assert common.class_weighted_cross_entropy(skewed, target2, weights).item() == pytest.approx(
        F.cross_entropy(skewed, target2, weight=weights).item()
    )
    loss.backward()  # on the graph


def test_class_weighted_cross_entropy_all_ignored_is_zero_on_the_graph():
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = common.class_weighted_cross_entropy(logits, torch.full((1, 2, 2), IGNORE), torch.tensor([1.0, 2.0]))
    assert loss.item() == 0.0
    loss.backward()


# --------------------------------------------------------------------------------------------
# CutMix
# --------------------------------------------------------------------------------------------


def test_apply_cutmix_pastes_the_partner_inside_the_box():
    # 2 images 3x3 of one channel: image 0 is all 1, image 1 all 2; labels 10 / 20 likewise.
    images = torch.stack([torch.full((1, 3, 3), 1.0), torch.full((1, 3, 3), 2.0)])
    labels = torch.stack([torch.full((3, 3), 10), torch.full((3, 3), 20)])
    box = torch.zeros(2, 3, 3, dtype=torch.bool)
    box[0, 0:2, 1:3] = True  # image 0 takes a 2x2 box, top right, from image 1
    box[1, 2, 0] = True  # image 1 takes one pixel, bottom left, from image 0
    partner = torch.tensor([1, 0])
    mixed_images = common.apply_cutmix(images, box, partner)
    mixed_labels = common.apply_cutmix(labels, box, partner)
    assert mixed_images[:, 0].tolist() == [
        [[1, 2, 2], [1, 2, 2], [1, 1, 1]],
        [[2, 2, 2], [2, 2, 2], [1, 2, 2]],
    ]
    assert mixed_labels.tolist() == [
        [[10, 20, 20], [10, 20, 20], [10, 10, 10]],
        [[20, 20, 20], [20, 20, 20], [10, 20, 20]],
    ]
    assert mixed_labels.dtype == labels.dtype
    # A bool reliability mask and (B, C, H, W) probabilities mix the same way.
    reliable = torch.tensor([True, False]).view(2, 1, 1).expand(2, 3, 3)
    assert common.apply_cutmix(reliable, box, partner).tolist() == [
        [[True, False, False], [True, False, False], [True, True, True]],
        [[False, False, False], [False, False, False], [True, False, False]],
    ]


def test_cutmix_boxes_follow_the_authors_half_area_box():
    generator = torch.Generator().manual_seed(0)
    height, width = 12, 16
    for _ in range(20):
        box, partner = common.cutmix_boxes(4, height, width, generator, p=1.0)
        assert partner.tolist() == [1, 2, 3, 0]
        for mask in box:
            rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
            box_h, box_w = len(rows), len(cols)
            assert mask.sum() == box_h * box_w  # one solid rectangle
            assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
            assert width // 2 + 1 <= box_w <= width - 1
            assert box_h == round(height * width / 2 / box_w)  # half the area, to the rounding of h


def test_cutmix_boxes_mix_a_batch_with_probability_p():
    generator = torch.Generator().manual_seed(1)
    mixed = [bool(common.cutmix_boxes(2, 8, 8, generator, p=0.5)[0].any()) for _ in range(400)]
    assert 0.4 < sum(mixed) / len(mixed) < 0.6
    assert not common.cutmix_boxes(2, 8, 8, generator, p=0.0)[0].any()
    with pytest.raises(ValueError, match="p must lie in"):
        common.cutmix_boxes(2, 8, 8, generator, p=1.5)
