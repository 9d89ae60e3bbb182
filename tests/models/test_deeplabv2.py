"""DeepLabv2: torchvision key compatibility, weight loading, shapes and strides.

ResNet-50 is built once (module fixture); ResNet-101 and the builder-option checks use the meta
device, where building costs no memory and no initialisation time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selftune.errors import ConfigError
from selftune.models import build_model
from selftune.models.deeplabv2 import FrozenBatchNorm2d, load_torchvision_resnet_weights

NUM_CLASSES = 3


def _bn(table: dict[str, tuple[int, ...]], prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        table[f"{prefix}.{name}"] = (channels,)
    table[f"{prefix}.num_batches_tracked"] = ()


def torchvision_resnet_table(layers: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's ResNet (Bottleneck, v1.5) state dict without ``fc``.

    Written from the architecture (He et al. table 1, torchvision's module names), not from our
    code: stem conv 7x7 64; layer i has ``layers[i]`` Bottlenecks of width 64 * 2**i, each
    1x1 (in -> w), 3x3 (w -> w), 1x1 (w -> 4w); the first of each layer has a 1x1 projection.
    """
    table: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    _bn(table, "bn1", 64)
    in_channels = 64
    for index, (count, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for block in range(count):
            prefix = f"layer{index}.{block}"
            table[f"{prefix}.conv1.weight"] = (width, in_channels, 1, 1)
            _bn(table, f"{prefix}.bn1", width)
            table[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            _bn(table, f"{prefix}.bn2", width)
            table[f"{prefix}.conv3.weight"] = (4 * width, width, 1, 1)
            _bn(table, f"{prefix}.bn3", 4 * width)
            if block == 0:
                table[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                _bn(table, f"{prefix}.downsample.1", 4 * width)
            in_channels = 4 * width
    return table


def backbone_table(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Our backbone keys with the block prefix stripped (``blocks.stem.`` / ``blocks.``)."""
    table = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            key = key.removeprefix("blocks.").removeprefix("stem.")
            table[key] = tuple(value.shape)
    return table


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return build_model("deeplabv2_resnet50", NUM_CLASSES).eval()


def test_resnet50_keys_and_shapes_equal_torchvision(resnet50):
    expected = torchvision_resnet_table((3, 4, 6, 3))
    assert backbone_table(resnet50) == expected
    # torchvision's resnet50 has 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
    assert sum(p.numel() for p in resnet50.blocks.parameters()) == 25_557_032 - 2_049_000


def test_resnet101_keys_and_shapes_equal_torchvision():
    with torch.device("meta"):
        model = build_model("deeplabv2_resnet101", NUM_CLASSES)
    assert backbone_table(model) == torchvision_resnet_table((3, 4, 23, 3))
    assert sum(p.numel() for p in model.blocks.parameters()) == 44_549_160 - 2_049_000


def test_head_is_deeplabv2_aspp(resnet50):
    convs = list(resnet50.head.conv2d_list)
    assert [conv.dilation for conv in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(conv.in_channels == 2048 and conv.out_channels == NUM_CLASSES for conv in convs)


def test_dilation_replaces_stride_like_torchvision(resnet50):
    # replace_stride_with_dilation=[False, True, True]: the first block of a dilated layer keeps the
    # previous dilation, the others use the new one; only layer2 still strides.
    def conv2(layer: str, block: int) -> nn.Conv2d:
        return resnet50.blocks[layer][block].conv2

    assert (conv2("layer2", 0).stride, conv2("layer2", 0).dilation) == ((2, 2), (1, 1))
    assert (conv2("layer3", 0).stride, conv2("layer3", 0).dilation) == ((1, 1), (1, 1))
    assert all(conv2("layer3", b).dilation == (2, 2) for b in range(1, 6))
    assert (conv2("layer4", 0).stride, conv2("layer4", 0).dilation) == ((1, 1), (2, 2))
    assert all(conv2("layer4", b).dilation == (4, 4) for b in range(1, 3))
    assert resnet50.blocks["layer3"][0].downsample[0].stride == (1, 1)


def test_output_at_input_resolution_and_block_info_matches_features(resnet50):
    images = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert resnet50(images).shape == (2, NUM_CLASSES, 33, 33)
        features = images
        for index, info in enumerate(resnet50.block_info):
            features = resnet50.forward_blocks(features, index, index + 1)
            side = math.ceil(33 / info.stride)
            assert tuple(features.shape) == (2, info.channels, side, side), info
    assert [(i.name, i.channels, i.stride) for i in resnet50.block_info] == [
        ("stem", 64, 4), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 8), ("layer4", 2048, 8),
    ]


def _torchvision_state(table: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.rand(shape, generator=generator) + 0.5  # positive: valid running_var
    state["fc.weight"] = torch.randn(1000, 2048, generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


def test_torchvision_state_dict_round_trips_exactly(resnet50, tmp_path):
    state = _torchvision_state(torchvision_resnet_table((3, 4, 6, 3)), torch.Generator().manual_seed(1))
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    head_before = {k: v.clone() for k, v in resnet50.head.state_dict().items()}

    load_torchvision_resnet_weights(resnet50, path)

    ours = {k.removeprefix("blocks.").removeprefix("stem."): v for k, v in resnet50.state_dict().items()}
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    for key, value in resnet50.head.state_dict().items():
        assert torch.equal(value, head_before[key]), "the head must not be touched"


def test_state_dict_without_num_batches_tracked_loads(resnet50):
    # torchvision's older ImageNet files predate BatchNorm's num_batches_tracked buffer.
    state = _torchvision_state(torchvision_resnet_table((3, 4, 6, 3)), torch.Generator().manual_seed(2))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_torchvision_resnet_weights(resnet50, state)
    assert torch.equal(resnet50.blocks.stem.conv1.weight, state["conv1.weight"])


def test_mismatching_file_names_file_and_first_keys(resnet50, tmp_path):
    # A ResNet-101 file: names are what matters, so tiny tensors keep the file small.
    state = {key: torch.zeros(1) for key in torchvision_resnet_table((3, 4, 23, 3))}
    path = tmp_path / "resnet101.pth"
    torch.save(state, path)
    message = r"resnet101\.pth do not fit the ResNet-50 backbone: unexpected keys 306 \(layer3\.6\."
    with pytest.raises(ConfigError, match=message) as info:
        load_torchvision_resnet_weights(resnet50, path)
    assert "\n" not in str(info.value)


def test_wrong_shape_and_missing_keys_are_reported(resnet50):
    state = _torchvision_state(torchvision_resnet_table((3, 4, 6, 3)), torch.Generator().manual_seed(4))
    del state["layer4.2.conv3.weight"]
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    message = (
        r"missing keys 1 \(layer4\.2\.conv3\.weight\); "
        r"wrong shapes 1 \(conv1\.weight \(64, 1, 7, 7\) != \(64, 3, 7, 7\)\)"
    )
    with pytest.raises(ConfigError, match=message):
        load_torchvision_resnet_weights(resnet50, state)


def test_unreadable_or_absent_file_is_a_config_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with torch.device("meta"), pytest.raises(ConfigError, match=r"cannot read pretrained weights file .*garbage\.pth"):
        build_model("deeplabv2_resnet50", NUM_CLASSES, pretrained=str(garbage))
    with torch.device("meta"), pytest.raises(ConfigError, match=r"weights file .*absent\.pth does not exist"):
        build_model("deeplabv2_resnet50", NUM_CLASSES, pretrained=str(tmp_path / "absent.pth"))


def test_pretrained_torchvision_without_torchvision_is_a_config_error():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pretrained='torchvision' needs torchvision"):
            build_model("deeplabv2_resnet50", NUM_CLASSES, pretrained="torchvision")
    else:
        pytest.skip("torchvision is installed; this checks the message shown where it is not")


def test_frozen_bn_keeps_running_statistics_and_affine_fixed():
    with torch.device("meta"):
        model = build_model("deeplabv2_resnet50", NUM_CLASSES, frozen_bn=True)
    norms = [m for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())

    norm = FrozenBatchNorm2d(4).train()  # train() must not switch to batch statistics
    assert not norm.training
    norm(torch.randn(2, 4, 3, 3) * 5 + 3)
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
