"""small_segnet: shapes, declared blocks against real features, branching after any block."""

from __future__ import annotations

import math

import pytest
import torch

from selftune.models import build_model
from selftune.models.small import small_segnet

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_segnet(NUM_CLASSES, width=16).eval()


def test_registered():
    net = build_model("small_segnet", NUM_CLASSES, width=8)
    assert net.num_classes == NUM_CLASSES
    assert net.block_info[-1].channels == 16


@pytest.mark.parametrize("size", [(64, 64), (48, 40), (33, 65)])
def test_output_at_input_resolution(model, size):
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, NUM_CLASSES, *size)


def test_block_info_matches_the_features(model):
    x = torch.randn(1, 3, 64, 64)
    names = [info.name for info in model.block_info]
    assert names == list(model.blocks.keys()) and len(names) >= 4
    with torch.no_grad():
        for k, info in enumerate(model.block_info):
            x = model.forward_blocks(x, k, k + 1)
            assert x.shape == (1, info.channels, 64 // info.stride, 64 // info.stride), info
    assert [info.stride for info in model.block_info] == sorted(info.stride for info in model.block_info)


def test_strides_round_up_on_odd_sizes(model):
    with torch.no_grad():
        features = model.forward_blocks(torch.randn(1, 3, 33, 65))
    stride = model.block_info[-1].stride
    assert features.shape[-2:] == (math.ceil(33 / stride), math.ceil(65 / stride))


@pytest.mark.parametrize("k", range(6))
def test_branching_after_any_block_gives_the_full_forward(model, k):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        trunk = model.forward_blocks(x, 0, k)
        logits = model.head(model.forward_blocks(trunk, k))
        rest = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert k <= len(model.block_info)
    torch.testing.assert_close(rest, full)


def test_trains(model):
    net = small_segnet(NUM_CLASSES, width=8).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, NUM_CLASSES, (4, 32, 32))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_options():
    assert [i.channels for i in small_segnet(3, width=8, dilations=(2, 4, 8)).block_info] == [8, 8, 16, 16, 16, 16]
    with pytest.raises(ValueError, match="width must be an even integer >= 2, but got 7"):
        small_segnet(3, width=7)
    with pytest.raises(ValueError, match=r"dilations must all be >= 1, but got \(0,\)"):
        small_segnet(3, dilations=(0,))
