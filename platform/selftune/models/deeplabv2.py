"""DeepLabv2: a dilated ResNet-50/101 (output stride 8) followed by the DeepLabv2 ASPP.

The network every paper in selftune reports on (Chen et al., "DeepLab", TPAMI 2018). Choices not
fixed by the paper, stated here:

* The backbone is torchvision's ResNet v1.5 (stride on the 3x3 ``conv2`` of a Bottleneck), with
  the strides of ``layer3`` and ``layer4`` replaced by dilation 2 and 4 exactly as torchvision's
  ``replace_stride_with_dilation=[False, True, True]`` does: the *first* Bottleneck of a dilated
  layer keeps the previous dilation (1 in ``layer3``, 2 in ``layer4``), the following ones use the
  new one. The Caffe DeepLabv2 puts the stride on ``conv1`` and dilates every block of a layer;
  we follow torchvision so that its ImageNet weights load without any renaming. The Caffe
  variant, for DeepLab's COCO weights, is ``deeplabv2_caffe_resnet101`` (``deeplabv2_caffe.py``).
* State-dict keys equal torchvision's once the block prefix is stripped: ``blocks.stem.conv1.weight``
  is torchvision's ``conv1.weight``, ``blocks.layer3.0.downsample.0.weight`` is
  ``layer3.0.downsample.0.weight``. ``load_torchvision_resnet_weights`` relies on this.
* ASPP is DeepLabv2's: four parallel 3x3 convolutions (dilation 6, 12, 18, 24) straight from the
  2048 backbone channels to class logits, *summed* (no 1x1 projection, no image pooling, no BN —
  those are DeepLabv3). Weights ~ N(0, 0.01) and zero bias, as in the DeepLabv2 prototxt.
* ``frozen_bn=True`` freezes every backbone BatchNorm: it always normalises with its running
  statistics and its affine parameters do not train, as in the Caffe DeepLabv2 and the
  CutMix-Seg / three-stage code (batches of 1-10 crops give poor batch statistics).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from selftune.errors import ConfigError
from selftune.models.network import BlockInfo, SegmentationNetwork
from selftune.models.registry import register_model

__all__ = [
    "ASPP",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "build_deeplabv2",
    "load_torchvision_resnet_weights",
]

# Bottlenecks per layer (He et al., table 1).
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
ASPP_DILATIONS = (6, 12, 18, 24)
TORCHVISION = "torchvision"  # the ``pretrained`` value that asks torchvision for ImageNet weights

Norm = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always uses its running statistics and never trains its scale and shift.

    A subclass rather than torchvision's buffer-only version so that the state-dict keys (including
    ``num_batches_tracked``) stay those of ``nn.BatchNorm2d`` and torchvision checkpoints load as is.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        # ``model.train()`` must not switch it back to batch statistics.
        return super().train(False)


class Bottleneck(nn.Module):
    """ResNet Bottleneck: 1x1 -> 3x3 (dilation) -> 1x1, plus shortcut.

    ``stride_on="conv2"`` (default) is torchvision's v1.5, striding in the 3x3; ``"conv1"`` is the
    original (Caffe) ResNet that DeepLab's weights come from, striding in the first 1x1. The
    parameters and their names are the same either way.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm: Norm = nn.BatchNorm2d,
        stride_on: str = "conv2",
    ):
        super().__init__()
        if stride_on not in ("conv1", "conv2"):
            raise ValueError(f"Bottleneck: stride_on must be 'conv1' or 'conv2', got {stride_on!r}")
        out_channels = width * self.expansion
        stride1, stride2 = (stride, 1) if stride_on == "conv1" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, stride=stride1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(
            width, width, kernel_size=3, stride=stride2, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample  # None adds no state-dict keys, as in torchvision

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 4 * width, H', W')
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ASPP(nn.Module):
    """DeepLabv2 atrous spatial pyramid pooling: ``sum_d conv3x3_d(x)``, each branch giving logits.

    (B, in_channels, h, w) -> (B, num_classes, h, w). The branch list is named ``conv2d_list`` as
    in the DeepLabv2 PyTorch ports (``layer5.conv2d_list.*``), which eases loading their weights.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


def _stem(norm: Norm, width: int = 64) -> nn.Sequential:
    """conv1 (7x7, stride 2) -> bn1 -> relu -> maxpool (3x3, stride 2): stride 4, ``width`` (64) channels."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
            bn1=norm(width),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    )


def _layer(
    in_channels: int, width: int, num_blocks: int, *, stride: int, dilation: int, first_dilation: int, norm: Norm,
    stride_on: str = "conv2",
) -> nn.Sequential:
    """One ResNet stage, the way torchvision's ``_make_layer`` builds it (see the module docstring)."""
    out_channels = width * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), norm(out_channels)
        )
    blocks = [
        Bottleneck(
            in_channels, width, stride=stride, dilation=first_dilation, downsample=downsample, norm=norm,
            stride_on=stride_on,
        )
    ]
    blocks += [Bottleneck(out_channels, width, dilation=dilation, norm=norm) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def _dilated_resnet(
    depth: int, norm: Norm, *, caffe: bool = False, base_width: int = 64
) -> list[tuple[BlockInfo, nn.Module]]:
    """``stem, layer1..layer4`` of a ResNet-``depth`` at output stride 8, with their BlockInfo.

    ``caffe=True``: DeepLab's ResNet — stride on the first 1x1 conv, and every Bottleneck of a
    dilated layer (the first included) uses that layer's dilation. ``base_width`` (64) scales every
    layer; anything else is for tests only (no weights exist for it).
    """
    blocks: list[tuple[BlockInfo, nn.Module]] = [(BlockInfo("stem", base_width, 4), _stem(norm, base_width))]
    in_channels, stride_so_far, dilation = base_width, 4, 1
    widths = tuple(base_width * factor for factor in (1, 2, 4, 8))
    layer_strides, dilate = (1, 2, 2, 2), (False, False, True, True)
    for index, (num_blocks, width, stride, use_dilation) in enumerate(
        zip(RESNET_LAYERS[depth], widths, layer_strides, dilate), start=1
    ):
        first_dilation = dilation
        if use_dilation:  # trade the stride for dilation, keeping the receptive field
            dilation *= stride
            stride = 1
            first_dilation = dilation if caffe else first_dilation
        layer = _layer(
            in_channels, width, num_blocks, stride=stride, dilation=dilation, first_dilation=first_dilation, norm=norm,
            stride_on="conv1" if caffe else "conv2",
        )
        in_channels, stride_so_far = width * Bottleneck.expansion, stride_so_far * stride
        blocks.append((BlockInfo(f"layer{index}", in_channels, stride_so_far), layer))
    return blocks


def _init_backbone(blocks: Sequence[tuple[BlockInfo, nn.Module]]) -> None:
    """torchvision's ResNet initialisation: He-normal (fan_out) convolutions, BN scale 1 and shift 0."""
    for _, block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def build_deeplabv2(
    num_classes: int, *, depth: int, pretrained: str | os.PathLike[str] | None = None, frozen_bn: bool = False
) -> SegmentationNetwork:
    """DeepLabv2 with a dilated ResNet-``depth`` backbone (50 or 101); logits at input resolution.

    ``pretrained``: None (random init), ``"torchvision"`` (torchvision's IMAGENET1K_V1 weights, the
    classic ImageNet ResNets, needs torchvision) or a path to a torchvision-format ResNet ``.pth``
    state dict. The ASPP head is always freshly initialised.
    """
    if depth not in RESNET_LAYERS:
        raise ConfigError(f"DeepLabv2 ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    # Read the weights before building, so a wrong path fails before seconds of initialisation.
    weights = _pretrained_state_dict(pretrained, depth) if pretrained is not None else None
    blocks = _dilated_resnet(depth, FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    _init_backbone(blocks)
    model = SegmentationNetwork(blocks, ASPP(blocks[-1][0].channels, num_classes), num_classes)
    if weights is not None:
        load_torchvision_resnet_weights(model, weights, source=str(pretrained))
    return model


@register_model("deeplabv2_resnet50")
def deeplabv2_resnet50(
    num_classes: int, *, pretrained: str | None = None, frozen_bn: bool = False
) -> SegmentationNetwork:
    return build_deeplabv2(num_classes, depth=50, pretrained=pretrained, frozen_bn=frozen_bn)


@register_model("deeplabv2_resnet101")
def deeplabv2_resnet101(
    num_classes: int, *, pretrained: str | None = None, frozen_bn: bool = False
) -> SegmentationNetwork:
    return build_deeplabv2(num_classes, depth=101, pretrained=pretrained, frozen_bn=frozen_bn)


# ---------------------------------------------------------------------------------------------
# torchvision weights


def _pretrained_state_dict(pretrained: str | os.PathLike[str], depth: int) -> Mapping[str, torch.Tensor]:
    if str(pretrained) == TORCHVISION:
        return _torchvision_imagenet_state_dict(depth)
    return _read_state_dict(Path(pretrained))


def _torchvision_imagenet_state_dict(depth: int) -> Mapping[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 ResNet weights (downloaded once into the torch hub cache)."""
    try:
        from torchvision.models import ResNet50_Weights, ResNet101_Weights
    except ImportError as error:
        raise ConfigError(
            "model option pretrained='torchvision' needs torchvision, which is not installed; install it "
            "or set pretrained to the path of a torchvision ResNet .pth state dict"
        ) from error
    weights = {50: ResNet50_Weights.IMAGENET1K_V1, 101: ResNet101_Weights.IMAGENET1K_V1}[depth]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # network or cache failures; the message says what to do instead
        raise ConfigError(
            f"could not fetch torchvision ResNet-{depth} weights from {weights.url} ({type(error).__name__}: "
            f"{error}); download the file and set pretrained to its path"
        ) from error


def _first_sentence(error: Exception) -> str:
    """torch.load's messages run to paragraphs (and suggest weights_only=False); one sentence suffices."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file {path} does not exist; use None, 'torchvision' or the path of a "
            "torchvision ResNet .pth state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = f"{type(error).__name__}: {_first_sentence(error)}"
        raise ConfigError(f"cannot read pretrained weights file {path}: {reason}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights file {path} does not hold a state dict (a mapping of name -> tensor)")
    return state


def _from_torchvision_key(key: str) -> str | None:
    """torchvision ResNet key -> key inside ``SegmentationNetwork.blocks``; None for keys we don't hold."""
    if key.startswith(("conv1.", "bn1.")):
        return "stem." + key
    if key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
        return key
    return None


def _to_torchvision_key(key: str) -> str:
    return key.removeprefix("stem.")


def _examples(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', …' if len(keys) > limit else ''})"


def load_torchvision_resnet_weights(
    model: SegmentationNetwork,
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    source: str | None = None,
) -> None:
    """Load a torchvision ResNet state dict (or ``.pth`` file) into the backbone of ``model``, strictly.

    The classifier ``fc.*`` is dropped; every other key must match a backbone key with the same
    shape, and every backbone key must be present (``*.num_batches_tracked`` may be missing: old
    torchvision files predate it and BatchNorm fills it in). The head is left untouched.
    Raises ConfigError naming ``source`` (the file, by default) and the first offending keys.
    """
    if isinstance(state_dict_or_path, Mapping):
        state, source = state_dict_or_path, source or "<state dict>"
    else:
        path = Path(state_dict_or_path)
        state, source = _read_state_dict(path), source or str(path)

    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.startswith("fc."):
            continue  # the ImageNet classifier: no counterpart in a segmentation network
        ours = _from_torchvision_key(key)
        if ours is None:
            unexpected.append(key)
        else:
            mapped[ours] = value

    expected = model.blocks.state_dict()
    unexpected += [_to_torchvision_key(k) for k in mapped if k not in expected]
    missing = [
        _to_torchvision_key(k) for k in expected if k not in mapped and not k.endswith(".num_batches_tracked")
    ]
    wrong_shape = [
        f"{_to_torchvision_key(k)} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_examples(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_examples(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_examples(wrong_shape)}")
    if problems:
        depth = _depth_of(model)
        raise ConfigError(
            f"pretrained weights {source} do not fit the ResNet-{depth} backbone: {'; '.join(problems)}; "
            f"expected a torchvision resnet{depth} state dict (fc.* is ignored)"
        )
    model.blocks.load_state_dict(mapped, strict=True)


def _depth_of(model: SegmentationNetwork) -> int | str:
    """50 / 101 from the number of Bottlenecks in layer3, for error messages."""
    layer3 = model.blocks["layer3"] if "layer3" in model.blocks else None
    count = len(layer3) if isinstance(layer3, nn.Sequential) else None
    return next((depth for depth, layers in RESNET_LAYERS.items() if layers[2] == count), "?")
