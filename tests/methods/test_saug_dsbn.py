"""Self-correction loss (eqs. 4-5) by hand, and DSBN's routing between its two BatchNorms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selftune.methods import saug_dsbn

IGNORE = 255
A = -math.log(1e-4)  # -log of the clipped zero of a one-hot label


def test_self_correction_loss_by_hand():
    # pixel a: scores (2, 0), label 0 (agrees); pixel b: scores (0, 1), label 0 (disagrees)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    labels = torch.tensor([[[0, 0]]])
    pa = math.exp(2) / (math.exp(2) + 1)  # p(label) at a; also the max probability w_a
    pb = 1 / (1 + math.e)  # p(label) at b
    wb = math.e / (1 + math.e)  # max probability at b (class 1)
    loss_a = pa * -math.log(pa) + (1 - pa) * A * (1 - pa)
    loss_b = wb * -math.log(pb) + (1 - wb) * A * (1 - pb)
    assert saug_dsbn.self_correction_loss(logits, labels).item() == pytest.approx((loss_a + loss_b) / 2, rel=1e-6)
    # SCE paper's A = 4 instead of the code's 9.21
    loss_a4 = pa * -math.log(pa) + (1 - pa) * 4 * (1 - pa)
    only_a = torch.tensor([[[0, IGNORE]]])
    clipped = saug_dsbn.self_correction_loss(logits, only_a, label_clip=math.exp(-4))
    assert clipped.item() == pytest.approx(loss_a4, rel=1e-6)


def test_self_correction_weight_is_detached_by_default():
    logits = torch.tensor([[[[2.0]], [[0.0]]]], requires_grad=True)
    saug_dsbn.self_correction_loss(logits, torch.tensor([[[0]]])).backward()
    p = math.exp(2) / (math.exp(2) + 1)
    w = p
    # d/dz [w CE + (1-w) A (1 - p_y)] with w constant; dp_y/dz = p (onehot - p) = (p(1-p), -p(1-p))
    ce_grad = [p - 1, 1 - p]
    rce_grad = [-A * p * (1 - p), A * p * (1 - p)]
    expected = torch.tensor([w * c + (1 - w) * r for c, r in zip(ce_grad, rce_grad)])
    assert torch.allclose(logits.grad.flatten(), expected.float(), atol=1e-6)
    free = torch.tensor([[[[2.0]], [[0.0]]]], requires_grad=True)
    saug_dsbn.self_correction_loss(free, torch.tensor([[[0]]]), detach_weight=False).backward()
    assert not torch.allclose(free.grad, logits.grad)


def test_self_correction_all_ignored_is_zero():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = saug_dsbn.self_correction_loss(logits, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0
    loss.backward()


def _dual_with_different_stats() -> saug_dsbn.DualBatchNorm2d:
    dual = saug_dsbn.DualBatchNorm2d(nn.BatchNorm2d(1))
    dual.strong.running_mean.fill_(5.0)
    dual.strong.running_var.fill_(4.0)
    return dual


def test_eval_always_uses_the_normal_bn():
    dual = _dual_with_different_stats().eval()
    x = torch.full((2, 1, 2, 2), 7.0)
    normal = (7.0 - 0.0) / math.sqrt(1.0 + 1e-5)
    with saug_dsbn.use_strong_bn(dual):
        out = dual(x)
    assert torch.allclose(out, torch.full_like(x, normal))
    dual.strong_from = 0
    assert torch.allclose(dual(x), torch.full_like(x, normal))  # even when set by hand


def test_training_routes_batches_and_updates_only_the_chosen_stats():
    dual = saug_dsbn.DualBatchNorm2d(nn.BatchNorm2d(1, momentum=0.5)).train()
    weak = torch.full((2, 1, 1, 1), 2.0) + torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)  # mean 2
    strong = torch.full((2, 1, 1, 1), 10.0) + torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)  # mean 10
    dual(weak)
    assert dual.normal.running_mean.item() == pytest.approx(1.0)  # 0.5 * 0 + 0.5 * 2
    assert dual.strong.running_mean.item() == 0.0
    with saug_dsbn.use_strong_bn(dual):
        dual(strong)
    assert dual.strong.running_mean.item() == pytest.approx(5.0)  # 0.5 * 0 + 0.5 * 10
    assert dual.normal.running_mean.item() == pytest.approx(1.0)
    assert dual.strong_from is None  # restored
    # one forward of cat([weak, strong]): each half with its own BN and batch statistics
    with saug_dsbn.use_strong_bn(dual, from_index=2):
        out = dual(torch.cat([weak, strong]))
    assert dual.normal.running_mean.item() == pytest.approx(1.5)  # 0.5 * 1 + 0.5 * 2
    assert dual.strong.running_mean.item() == pytest.approx(7.5)  # 0.5 * 5 + 0.5 * 10
    # each half normalised by its own mean: (x - mean) / std -> (-1, 1) in both halves
    assert out.flatten().tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-4)


def test_use_strong_bn_restores_on_error_and_needs_dsbn():
    dual = saug_dsbn.DualBatchNorm2d(nn.BatchNorm2d(1))
    with pytest.raises(RuntimeError, match="boom"):
        with saug_dsbn.use_strong_bn(dual):
            raise RuntimeError("boom")
    assert dual.strong_from is None
    with pytest.raises(ValueError, match="call convert_to_dsbn"):
        with saug_dsbn.use_strong_bn(nn.Sequential(nn.BatchNorm2d(1))):
            pass


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def test_convert_to_dsbn_copies_into_both_and_keeps_eval_output():
    model = _small_model()
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    original_keys = set(model.state_dict())
    converted = saug_dsbn.convert_to_dsbn(model)
    duals = [m for m in converted.modules() if isinstance(m, saug_dsbn.DualBatchNorm2d)]
    assert len(duals) == 2
    for dual in duals:
        assert dual.normal is not dual.strong
        for name, value in dual.normal.state_dict().items():
            assert torch.equal(value, dual.strong.state_dict()[name])
    assert torch.allclose(converted(x), before)
    assert "1.normal.running_mean" in converted.state_dict() and "1.strong.weight" in converted.state_dict()
    assert saug_dsbn.convert_to_dsbn(converted) is converted  # idempotent
    assert len([m for m in converted.modules() if isinstance(m, saug_dsbn.DualBatchNorm2d)]) == 2
    plain = saug_dsbn.convert_from_dsbn(converted)
    assert set(plain.state_dict()) == original_keys
    assert torch.allclose(plain(x), before)


# --------------------------------------------------------------------------------------------
# DSBN on a frozen-BN network (frozen_bn: true)
# --------------------------------------------------------------------------------------------


def _frozen_net(**convert) -> nn.Module:
    from selftune.models.deeplabv2 import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), FrozenBatchNorm2d(2))
    return saug_dsbn.convert_to_dsbn(net, **convert)


def _one_step(model: nn.Module) -> None:
    """One training step: weak images through the normal BN, shifted strong images through the PBN."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    weak = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    strong = 3.0 + 2.0 * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    loss = model(weak).square().mean()
    with saug_dsbn.use_strong_bn(model):
        loss = loss + model(strong).square().mean()
    loss.backward()
    optimizer.step()


def test_frozen_bn_gets_a_trainable_strong_bn_whose_statistics_move():
    model = _frozen_net()
    dual = model[1]
    assert type(dual.strong) is nn.BatchNorm2d and dual.strong.weight.requires_grad
    saug_dsbn.check_strong_bn_trainable(model)  # accepted
    normal_before = {k: v.clone() for k, v in dual.normal.state_dict().items()}
    assert torch.equal(dual.strong.running_mean, normal_before["running_mean"])  # both start equal
    _one_step(model)
    assert all(torch.equal(v, normal_before[k]) for k, v in dual.normal.state_dict().items())  # still frozen
    assert not torch.allclose(dual.strong.running_mean, dual.normal.running_mean)
    assert not torch.allclose(dual.strong.running_var, dual.normal.running_var)
    assert not torch.equal(dual.strong.weight, dual.normal.weight)  # the PBN's affine trained


def test_trainable_bns_get_different_statistics_from_different_inputs():
    torch.manual_seed(0)
    model = saug_dsbn.convert_to_dsbn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    _one_step(model)
    dual = model[1]
    assert not torch.allclose(dual.strong.running_mean, dual.normal.running_mean)


def test_the_former_frozen_copy_is_refused_by_the_check():
    model = _frozen_net(unfreeze_strong=False)
    dual = model[1]
    before = dual.strong.running_mean.clone()
    _one_step(model)
    assert torch.equal(dual.strong.running_mean, before)  # a frozen PBN: DSBN did nothing
    with pytest.raises(ValueError, match="strong BatchNorms are frozen"):
        saug_dsbn.check_strong_bn_trainable(model)
    with pytest.raises(ValueError, match="no DualBatchNorm2d"):
        saug_dsbn.check_strong_bn_trainable(nn.Sequential(nn.BatchNorm2d(1)))
