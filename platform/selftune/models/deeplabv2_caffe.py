"""``deeplabv2_caffe_resnet101``: DeepLabv2 on DeepLab's own (Caffe) ResNet-101, as the papers use it.

The COCO-pretrained ``MS_DeepLab_resnet_pretrained_COCO_init.pth`` (AdvSemiSeg, and the DST-CBC
file ``resnet101COCO-41f33a49.pth``) holds the weights of the original Caffe DeepLabv2, whose
ResNet differs from torchvision's v1.5 (``deeplabv2_resnet101``) in the computation, not in the
parameters:

* the stride of a stage sits on the first 1x1 conv of its first Bottleneck (``conv1``), not on
  the 3x3;
* every Bottleneck of ``layer3`` / ``layer4`` is dilated 2 / 4, the first one included;
* the input is BGR in 0..255 minus the Caffe mean (104.008, 116.669, 122.675), no std. selftune's
  loaders give ImageNet-normalised RGB, so the stem starts with ``CaffeInput``, a fixed map from
  one to the other (no parameters, no state-dict keys): the data pipeline stays the same for
  every model, and a checkpoint of this model labels images like any other.

Not copied: the Caffe ``pool1`` rounds up (``ceil_mode=True``); we keep the floor so that every
block's output is exactly input / stride (the two agree on odd sizes such as the papers' 321).
BatchNorm is ``nn.BatchNorm2d`` (eps 1e-5) or, with ``frozen_bn=True``, frozen, as AdvSemiSeg
freezes it.

Weights: ``pretrained`` = the path of such a checkpoint, read by its own key names
(``load_deeplab_caffe_weights``): ``conv1.*``, ``bn1.*``, ``layer1..4.*`` (with
``downsample.0/1``), ``layer5.conv2d_list.{0..3}.*``, each optionally prefixed ``Scale.`` (the
multi-scale wrapper ``MS_Deeplab`` of isht7/pytorch-deeplab-resnet). Every key is checked.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from selftune.errors import ConfigError
from selftune.models.deeplabv2 import (
    ASPP,
    FrozenBatchNorm2d,
    _dilated_resnet,
    _examples,
    _init_backbone,
    _read_state_dict,
    build_deeplabv2,
)
from selftune.models.network import SegmentationNetwork
from selftune.models.registry import register_model

__all__ = ["CaffeInput", "build_deeplabv2_caffe", "deeplab_caffe_key", "load_deeplab_caffe_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, what selftune's loaders subtract (data.dataset)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.008, 116.669, 122.675)  # DeepLab's Caffe mean, BGR order, 0..255 scale
CAFFE_PREFIXES = ("Scale.", "module.")  # isht7's MS_Deeplab wrapper; a DataParallel save


class CaffeInput(nn.Module):
    """ImageNet-normalised RGB (B, 3, H, W) -> Caffe input: BGR, 0..255, minus ``CAFFE_BGR_MEAN``.

    ``out[c] = 255 (x[2 - c] std[2 - c] + mean[2 - c]) - caffe_mean[c]``. The constants are
    non-persistent buffers: they move with the model but stay out of the state dict.
    """

    def __init__(self):
        super().__init__()
        std_bgr = torch.tensor(IMAGENET_STD[::-1])
        mean_bgr = torch.tensor(IMAGENET_MEAN[::-1])
        self.register_buffer("scale", (255.0 * std_bgr).view(1, 3, 1, 1), persistent=False)
        shift = 255.0 * mean_bgr - torch.tensor(CAFFE_BGR_MEAN)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def build_deeplabv2_caffe(
    num_classes: int,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    frozen_bn: bool = False,
    base_width: int = 64,
) -> SegmentationNetwork:
    """DeepLabv2 on DeepLab's Caffe ResNet-101; ``pretrained``: None or a DeepLab checkpoint path.

    ``base_width`` is 64 for the real network (the only width any checkpoint has); tests build
    it narrower. The ASPP head is loaded from the checkpoint when it has ``num_classes`` outputs
    (the COCO file: 21, PASCAL VOC's classes) and freshly initialised otherwise, as AdvSemiSeg does.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if base_width < 1:
        raise ConfigError(f"base_width must be >= 1, got {base_width}")
    weights = _read_state_dict(Path(pretrained)) if pretrained is not None else None
    blocks = _dilated_resnet(101, FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d, caffe=True, base_width=base_width)
    _init_backbone(blocks)
    stem_info, stem = blocks[0]
    blocks[0] = (stem_info, nn.Sequential(OrderedDict([("input", CaffeInput()), *stem.named_children()])))
    model = SegmentationNetwork(blocks, ASPP(blocks[-1][0].channels, num_classes), num_classes)
    if weights is not None:
        load_deeplab_caffe_weights(model, weights, source=str(pretrained))
    return model


@register_model("deeplabv2_caffe_resnet101")
def deeplabv2_caffe_resnet101(
    num_classes: int, *, pretrained: str | None = None, frozen_bn: bool = False, base_width: int = 64
) -> SegmentationNetwork:
    return build_deeplabv2_caffe(num_classes, pretrained=pretrained, frozen_bn=frozen_bn, base_width=base_width)


@register_model("deeplabv2")
def deeplabv2(num_classes: int, *, pretrained: str | None = None, frozen_bn: bool = False) -> SegmentationNetwork:
    """Short name for ``deeplabv2_resnet101`` (torchvision's ResNet-101; ``pretrained="torchvision"``
    for its ImageNet weights). For DeepLab's COCO weights use ``deeplabv2_caffe_resnet101``."""
    return build_deeplabv2(num_classes, depth=101, pretrained=pretrained, frozen_bn=frozen_bn)


# ---------------------------------------------------------------------------------------------
# DeepLab checkpoint keys


def deeplab_caffe_key(key: str) -> str | None:
    """A DeepLab checkpoint key -> our state-dict key; None for a key we have no place for.

    ``Scale.conv1.weight`` -> ``blocks.stem.conv1.weight``; ``Scale.layer3.0.downsample.1.running_mean``
    -> ``blocks.layer3.0.downsample.1.running_mean``; ``Scale.layer5.conv2d_list.2.bias`` ->
    ``head.conv2d_list.2.bias``. The ``Scale.`` (or ``module.``) prefix is optional.
    """
    for prefix in CAFFE_PREFIXES:
        key = key.removeprefix(prefix)
    if key.startswith(("conv1.", "bn1.")):
        return "blocks.stem." + key
    if key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
        return "blocks." + key
    if key.startswith("layer5.conv2d_list."):
        return "head." + key.removeprefix("layer5.")
    return None


def _deeplab_name(key: str) -> str:
    """Our key -> its DeepLab name without prefix (the inverse of ``deeplab_caffe_key``)."""
    if key.startswith("head."):
        return "layer5." + key.removeprefix("head.")
    return key.removeprefix("blocks.").removeprefix("stem.")


def load_deeplab_caffe_weights(
    model: SegmentationNetwork,
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    source: str | None = None,
) -> bool:
    """Load a DeepLab checkpoint into ``model`` by its own key names; True when the head was loaded too.

    Every checkpoint key must map to a key of the model with the same shape, and every backbone
    key of the model must be present (``*.num_batches_tracked`` may be missing: the Caffe
    conversions predate it). The ASPP head (``layer5``) is loaded when all its keys are there
    with our shapes (same number of classes), and otherwise left as initialised. Raises
    ConfigError naming ``source`` and the first missing / unexpected / mis-shaped keys.
    """
    if isinstance(state_dict_or_path, Mapping):
        state, source = state_dict_or_path, source or "<state dict>"
    else:
        state, source = _read_state_dict(Path(state_dict_or_path)), source or str(state_dict_or_path)
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}  # our key -> the checkpoint's, for messages
    unexpected: list[str] = []
    for key, value in state.items():
        ours = deeplab_caffe_key(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
        else:
            mapped[ours], original[ours] = value, key
    missing = [
        _deeplab_name(k) for k in expected
        if k.startswith("blocks.") and k not in mapped and not k.endswith(".num_batches_tracked")
    ]
    wrong_shape = [
        f"{original[k]} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k.startswith("blocks.") and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} keys {_examples(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong_shape))
        if keys
    ]
    if problems:
        raise ConfigError(
            f"pretrained weights {source} do not fit the DeepLab ResNet-101: {'; '.join(problems)}; expected a "
            "DeepLab checkpoint (conv1.*, bn1.*, layer1..4.*, layer5.conv2d_list.*, optionally prefixed Scale.)"
        )
    head = {k: v for k, v in mapped.items() if k.startswith("head.")}
    head_fits = set(head) == {k for k in expected if k.startswith("head.")} and all(
        v.shape == expected[k].shape for k, v in head.items()
    )
    backbone = {k.removeprefix("blocks."): v for k, v in mapped.items() if k.startswith("blocks.")}
    model.blocks.load_state_dict(backbone, strict=False)  # strictness checked above (num_batches_tracked aside)
    if head_fits:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()}, strict=True)
    return head_fits
