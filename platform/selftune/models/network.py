"""The network interface every selftune model implements.

A segmentation network is an ordered list of blocks followed by a head. Each block declares its
output channels and its cumulative stride (``BlockInfo``), so code that grows a second head after
block ``k`` (the multi-task stages of the three-stage method) can size that head from the
declaration instead of hard-coding 2048 or 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


def bare_network(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def parameter_groups(model: nn.Module, base_lr: float, head_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone at ``base_lr``, the head at ``head_lr_mult * base_lr``.

    The head is everything under the ``head`` module of every ``SegmentationNetwork`` in
    ``model`` — DeepLabv2's ASPP classifier, a ``multi_head`` network's main head and its whole
    branch (U2PL's projection head, the three-stage second task head) — the new layers that
    DeepLab-family training runs at 10x the pretrained backbone's rate; the backbone is everything
    else. ``model`` may be a network, a wrapper holding one (a student + EMA teacher pair, DDP,
    torch.compile): the parameters are the same objects. Only parameters with ``requires_grad``
    are listed (a frozen BN's or an EMA teacher's are not), each exactly once, in
    ``model.parameters()`` order. Groups: ``[{"name": "backbone", ...}, {"name": "head", ...}]``,
    an empty group left out; a model without a segmentation head (the auxiliary confidence net)
    is one "backbone" group, which only ``head_lr_mult = 1`` accepts. Schedulers of
    ``torch.optim.lr_scheduler`` scale each group relative to its own initial lr.
    """
    if head_lr_mult <= 0:
        raise ValueError(f"head_lr_mult must be > 0, but got {head_lr_mult}")
    head_ids = {
        id(p) for module in bare_network(model).modules() if isinstance(module, SegmentationNetwork)
        for p in module.head.parameters()
    }
    if not head_ids and head_lr_mult != 1.0:
        raise ValueError(
            f"parameter_groups: {type(bare_network(model)).__name__} holds no SegmentationNetwork head, so "
            f"head_lr_mult={head_lr_mult} has nothing to apply to; use 1"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "backbone", "params": [p for p in trainable if id(p) not in head_ids], "lr": base_lr},
        {"name": "head", "params": [p for p in trainable if id(p) in head_ids], "lr": base_lr * head_lr_mult},
    ]
    return [group for group in groups if group["params"]]
