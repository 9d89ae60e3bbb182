"""``multi_head``: any registered network plus a second branch that shares its first modules.

The three-stage method (Ke et al., seed 000, sec. 3.2-3.3) trains a main head ``f`` and a second
task head (``ĝ`` in stage 2, ``g̃`` in stage 3) that share the first modules of the network. A
network here is the ordered list ``blocks[0], ..., blocks[-1], head`` — N modules in all. With
``shared_blocks = "N-k"`` the first N-k modules are shared and the branch owns copies of the last
k: for DeepLabv2 (stem, layer1..layer4, ASPP; N = 6) "N-2" shares stem..layer3 and the branch owns
its own layer4 + ASPP (stage 2), "N-1" shares everything up to layer4 and the branch owns only an
ASPP (stage 3). An int says how many modules are shared.

The branch starts as a deep copy of the main path's modules (so a pretrained layer4 stays
pretrained; the authors' ``layer4_2`` is a half-width, separately built copy — we keep the full
width, which needs no new channel bookkeeping). ``branch="projection"`` replaces the copied
classifier by a small projection head (conv3x3-BN-ReLU-conv1x1 to ``projection_dim``) at block
resolution: the feature representation U2PL contrasts (seed 002, sec. 3.3).

``forward(x)`` returns the main head's logits only, so a checkpoint of this model labels images
like any other network; ``forward(x, both=True)`` returns ``(main, branch)`` for training.
State-dict keys: ``blocks.*`` (the base's blocks), ``head.main.*`` (its head), ``head.branch.*``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selftune.models.network import SegmentationNetwork
from selftune.models.registry import build_model, register_model

__all__ = ["MultiHeadNetwork", "multi_head", "resolve_shared_blocks"]

BRANCH_KINDS = ("classifier", "projection")


def resolve_shared_blocks(spec: int | str, num_modules: int) -> int:
    """Number of shared modules out of ``num_modules`` (= blocks + head) for ``"N-k"`` or an int.

    At least one module must stay in the branch (sharing all N would make the heads identical).
    """
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*N\s*-\s*(\d+)\s*", spec)
        if match is None:
            raise ValueError(f"shared_blocks must be 'N-k' or an int, but got {spec!r}")
        shared = num_modules - int(match.group(1))
    else:
        shared = int(spec)
    if not 0 <= shared <= num_modules - 1:
        raise ValueError(
            f"shared_blocks must leave 0 <= shared <= N-1 = {num_modules - 1} modules shared "
            f"(N = blocks + head = {num_modules}), but got {spec!r} -> {shared}"
        )
    return shared


def _projection_head(channels: int, dim: int) -> nn.Sequential:
    # U2PL's representation head: conv3x3 + BN + ReLU, then a 1x1 projection.
    return nn.Sequential(
        nn.Conv2d(channels, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 1),
    )


class MultiHeadNetwork(SegmentationNetwork):
    """A base network (main path ``f``) plus a branch after the first ``shared`` modules."""

    def __init__(self, base: SegmentationNetwork, shared: int, *, branch: str = "classifier", projection_dim: int = 64):
        if branch not in BRANCH_KINDS:
            raise ValueError(f"branch must be one of {BRANCH_KINDS}, but got {branch!r}")
        blocks = list(zip(base.block_info, base.blocks.values()))
        super().__init__(blocks, base.head, base.num_classes)
        self.shared = shared
        self.branch_kind = branch
        owned = [copy.deepcopy(module) for module in list(base.blocks.values())[shared:]]
        if branch == "classifier":
            owned.append(copy.deepcopy(base.head))
        else:
            owned.append(_projection_head(base.block_info[-1].channels, projection_dim))
        # ``self.head`` is replaced by a dict so every key stays under "blocks." or "head.".
        self.head = nn.ModuleDict({"main": base.head, "branch": nn.Sequential(*owned)})

    def forward(self, x: torch.Tensor, both: bool = False):  # (B, 3, H, W) -> (B, C, H, W)
        shared = self.forward_blocks(x, 0, self.shared)
        main = self.head["main"](self.forward_blocks(shared, self.shared))
        main = F.interpolate(main, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not both:
            return main
        branch = self.head["branch"](shared)
        if self.branch_kind == "classifier":
            branch = F.interpolate(branch, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return main, branch  # branch: (B, C, H, W) logits, or (B, D, h, w) projected features

    def shared_parameter_names(self) -> list[str]:
        names = [f"blocks.{name}." for name in list(self.blocks)[: self.shared]]
        return [key for key, _ in self.named_parameters() if key.startswith(tuple(names))]


@register_model("multi_head")
def multi_head(
    num_classes: int,
    base: str = "small_segnet",
    base_options: dict[str, Any] | None = None,
    shared_blocks: int | str = "N-2",
    branch: str = "classifier",
    projection_dim: int = 64,
    pretrained: Any = None,
) -> MultiHeadNetwork:
    """``base`` (a registered model name, built with ``base_options``) with a second branch.

    ``pretrained`` is passed on to the base; it is a top-level option so that ``load_checkpoint``
    (which drops top-level ``pretrained``) does not fetch initial weights it will overwrite.
    """
    if base == "multi_head":
        raise ValueError("multi_head cannot wrap itself; give a plain network as base")
    options = dict(base_options or {})
    if pretrained is not None:
        options["pretrained"] = pretrained
    network = build_model(base, num_classes, **options)
    shared = resolve_shared_blocks(shared_blocks, len(network.block_info) + 1)
    return MultiHeadNetwork(network, shared, branch=branch, projection_dim=projection_dim)


def multi_head_config(model_name: str, model_options: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``{name, options}`` of a multi_head around the pipeline's model, for a stage's model config.

    ``pretrained`` moves to the top level (see ``multi_head``).
    """
    base_options = dict(model_options)
    pretrained = base_options.pop("pretrained", None)
    extra = {"pretrained": pretrained} if pretrained is not None else {}
    return {"name": "multi_head", "options": {"base": model_name, "base_options": base_options, **extra, **options}}
