"""``small_segnet``: a small dilated residual CNN for CPU runs, tests and the embedded default.

Layout (``w`` = ``width``), strides are cumulative w.r.t. the input::

    stem     conv3x3/2 (3 -> w/2) + conv3x3 (w/2 -> w)      stride 2
    layer1   residual block, w -> w, downsample /2           stride 4
    layer2   residual block, w -> 2w                         stride 4
    context1 residual block, 2w, dilation d[0]               stride 4
    context2 residual block, 2w, dilation d[1]               stride 4
    head     conv3x3 (2w -> w) + conv1x1 (w -> num_classes)

Stride 4 keeps a 64x64 image's features at 16x16, where the dilated blocks see most of the image
(receptive field ~70 px with dilations (2, 4)) at the cost of about 0.1 GMAC per image with w=32.
BatchNorm follows every conv; the head's dropout is off by default.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from selftune.models.network import BlockInfo, SegmentationNetwork
from selftune.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_model("small_segnet")
def small_segnet(
    num_classes: int,
    width: int = 32,
    *,
    dilations: Sequence[int] = (2, 4),
    dropout: float = 0.0,
) -> SegmentationNetwork:
    """A stride-4 dilated residual network: stem, two residual blocks, one dilated block per entry
    of ``dilations``, then a conv3x3 + conv1x1 head. ``width`` scales every layer."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, but got {num_classes}")
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2, but got {width}")
    if any(d < 1 for d in dilations):
        raise ValueError(f"dilations must all be >= 1, but got {tuple(dilations)}")
    w = width
    blocks: list[tuple[BlockInfo, nn.Module]] = [
        (BlockInfo("stem", w, 2), nn.Sequential(_conv_bn_relu(3, w // 2, stride=2), _conv_bn_relu(w // 2, w))),
        (BlockInfo("layer1", w, 4), ResidualBlock(w, w, stride=2)),
        (BlockInfo("layer2", 2 * w, 4), ResidualBlock(w, 2 * w)),
    ]
    for i, d in enumerate(dilations, start=1):
        blocks.append((BlockInfo(f"context{i}", 2 * w, 4), ResidualBlock(2 * w, 2 * w, dilation=d)))
    head = nn.Sequential(
        _conv_bn_relu(2 * w, w),
        nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        nn.Conv2d(w, num_classes, 1),
    )
    return SegmentationNetwork(blocks, head, num_classes)
