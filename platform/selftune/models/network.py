"""The network interface every selftune model implements.

A segmentation network is an ordered list of blocks followed by a head. Each block declares its
output channels and its cumulative stride (``BlockInfo``), so code that grows a second head after
block ``k`` (the multi-task stages of the three-stage method) can size that head from the
declaration instead of hard-coding 2048 or 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BlockInfo:
    name: str
    channels: int  # output channels of the block
    stride: int  # cumulative stride w.r.t. the input image after this block


class SegmentationNetwork(nn.Module):
    """``blocks[0] -> ... -> blocks[-1] -> head``; logits are upsampled to the input size.

    ``blocks`` is an ``nn.ModuleDict`` in order, so state-dict keys read ``blocks.<name>.…``
    (e.g. ``blocks.layer3.0.conv1.weight``).
    """

    def __init__(self, blocks: Sequence[tuple[BlockInfo, nn.Module]], head: nn.Module, num_classes: int):
        super().__init__()
        self.block_info: list[BlockInfo] = [info for info, _ in blocks]
        self.blocks = nn.ModuleDict({info.name: module for info, module in blocks})
        self.head = head
        self.num_classes = num_classes

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` (python slice semantics) on ``x``."""
        for module in list(self.blocks.values())[start:stop]:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H, W)
        logits = self.head(self.forward_blocks(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
