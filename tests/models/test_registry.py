"""Every registered model gets a smoke test: builds, keeps the input size, declares its blocks truly."""

from __future__ import annotations

import math

import pytest
import torch

from selftune.errors import ConfigError
from selftune.models import available_models, build_model

NUM_CLASSES = 3


def test_registry_holds_the_shipped_models():
    assert {"small_segnet", "deeplabv2_resnet50", "deeplabv2_resnet101", "multi_head"} <= set(available_models())


@pytest.mark.parametrize("name", available_models())
def test_model_smoke(name):
    """Built once per model (ResNet-101 is the costly one); tiny inputs in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES).eval()
    assert model.num_classes == NUM_CLASSES
    assert [info.name for info in model.block_info] == list(model.blocks)
    assert all(key.startswith(("blocks.", "head.")) for key in model.state_dict())

    with torch.no_grad():
        # An odd size: logits must come back at exactly the input resolution.
        assert model(torch.randn(2, 3, 33, 33)).shape == (2, NUM_CLASSES, 33, 33)

        # A size divisible by every stride, so any sane padding gives exactly size / stride.
        size = 4 * max(info.stride for info in model.block_info)
        features = torch.randn(2, 3, size, size)
        previous_stride = 1
        for index, info in enumerate(model.block_info):
            features = model.forward_blocks(features, index, index + 1)
            assert tuple(features.shape) == (2, info.channels, size // info.stride, size // info.stride), info
            assert info.stride >= previous_stride and math.log2(info.stride).is_integer()
            previous_stride = info.stride


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet9000'; available models are: .*deeplabv2_resnet101"):
        build_model("resnet9000", NUM_CLASSES)
