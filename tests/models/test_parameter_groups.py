"""Per-parameter-group learning rates: the head (ASPP / classifier / branch) at head_lr_mult x the backbone's."""

from __future__ import annotations

import copy

import pytest
import torch

from selftune.models import build_model, parameter_groups

NUM_CLASSES = 3


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name, options", [
    ("small_segnet", {"width": 8}),
    ("multi_head", {"base": "small_segnet", "base_options": {"width": 8}, "shared_blocks": "N-2"}),
    ("deeplabv2_resnet50", {"frozen_bn": True}),
])
def test_groups_hold_every_trainable_parameter_once_and_the_head_at_10x(name, options):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, **options)
    groups = parameter_groups(model, base_lr=0.01, head_lr_mult=10)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(_ids(p for p in model.parameters() if p.requires_grad))  # each exactly once
    assert len(listed) == len(set(listed))
    assert set(_ids(groups[1]["params"])) == set(_ids(p for p in model.head.parameters() if p.requires_grad))
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == 0.01 and lrs["head"] == pytest.approx(0.1)
    if options.get("frozen_bn"):  # a frozen BN's affine parameters are in no group
        frozen = model.blocks["stem"].bn1.weight
        assert id(frozen) not in listed


def test_a_poly_schedule_keeps_the_10x_ratio():
    model = build_model("small_segnet", NUM_CLASSES, width=8)
    optimizer = torch.optim.SGD(parameter_groups(model, 0.01, 10), lr=0.01)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=10, power=0.9)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    backbone, head = (g["lr"] for g in optimizer.param_groups)
    assert head == pytest.approx(10 * backbone) and backbone < 0.01


def test_with_mult_1_a_step_equals_the_flat_parameter_list_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("small_segnet", NUM_CLASSES, width=8)
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 16, 16)
    for net, params in ((model, parameter_groups(model, 0.05, 1.0)), (twin, [p for p in twin.parameters()])):
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
        for _ in range(2):
            optimizer.zero_grad()
            net(images).square().mean().backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


class _StudentTeacher(torch.nn.Module):
    """Like stages.teacher.MeanTeacher: a student and a frozen copy as the EMA teacher."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)


def test_a_student_teacher_pair_groups_the_students_parameters_only():
    student = build_model("multi_head", NUM_CLASSES, base="small_segnet", base_options={"width": 8})
    groups = parameter_groups(_StudentTeacher(student), 0.01, 10)
    assert sorted(_ids(p for g in groups for p in g["params"])) == sorted(_ids(student.parameters()))
    assert set(_ids(groups[1]["params"])) == set(_ids(student.head.parameters()))


def test_bad_multiplier_and_headless_models():
    model = build_model("small_segnet", NUM_CLASSES, width=8)
    with pytest.raises(ValueError, match="head_lr_mult must be > 0"):
        parameter_groups(model, 0.01, 0)
    with pytest.raises(ValueError, match="holds no SegmentationNetwork head"):
        parameter_groups(torch.nn.Linear(2, 2), 0.01, 10)
    only = parameter_groups(torch.nn.Linear(2, 2), 0.01, 1)  # e.g. the auxiliary confidence net
    assert [g["name"] for g in only] == ["backbone"] and len(only[0]["params"]) == 2
