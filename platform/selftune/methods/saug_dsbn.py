"""Yuan et al., "A Simple Baseline ... with Strong Data Augmentation": DSBN and the self-correction loss.

* ``DualBatchNorm2d`` / ``convert_to_dsbn`` / ``use_strong_bn``: distribution-specific batch norm
  (Sec. 3.2) — a parallel BN, initialised from the original, normalises the strongly augmented
  (pseudo-labelled) images during training; at test time only the normal BN is used.
* ``self_correction_loss``: eqs. 4-5, per pixel ``w * CE + (1 - w) * RCE`` with ``w`` the
  prediction's max softmax probability.

The paper's strong augmentation (N ops from a pool of photometric ops) is a data transform and
lives with the other transforms, not here.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selftune.methods.common import IGNORE_INDEX

__all__ = [
    "DualBatchNorm2d",
    "check_strong_bn_trainable",
    "convert_from_dsbn",
    "convert_to_dsbn",
    "self_correction_loss",
    "set_strong_bn",
    "use_strong_bn",
]


# --------------------------------------------------------------------------------------------
# Self-correction loss (eqs. 4-5)
# --------------------------------------------------------------------------------------------


def self_correction_loss(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    label_clip: float = 1e-4,
    detach_weight: bool = True,
) -> torch.Tensor:
    """Eqs. 4-5: mean over labelled pixels of ``w * CE + (1 - w) * RCE``.

    logits: (B, C, H, W) student scores y*; pseudo_labels: (B, H, W) long hard pseudo labels y
    (``ignore_index`` = no label). Per pixel, with p = softmax(logits) and y the label:

    * ``w = max_c p_c`` (eq. 5): a confident prediction learns the label (positive learning),
      an unsure one mostly gets the noise-robust reverse term;
    * ``CE = -log p_y`` (eq. 4's ``y log y*``, sign made explicit: the paper writes the
      log-likelihood, the loss is its negative);
    * ``RCE = -sum_c p_c log y_c`` (eq. 4's ``y* log y``), the reverse cross-entropy of
      symmetric cross-entropy (the paper's ref. [33]). log 0 of the one-hot label is clipped:
      ``y_c`` is clamped to ``[label_clip, 1]``, so ``RCE = -log(label_clip) * (1 - p_y)``.
      label_clip = 1e-4 (log = -9.21) is SCE's released code and U2PL's ``compute_rce_loss``;
      the SCE paper's text uses A = log 0 := -4, i.e. ``label_clip = exp(-4)``.

    The paper does not say whether w is back-propagated through; by default it is a weight
    (detached), like DST-CBC's dynamic weight. ``detach_weight=False`` lets the gradient flow.
    Averaged over non-ignored pixels; every pixel ignored -> 0 with the graph kept.
    """
    if not 0.0 < label_clip <= 1.0:
        raise ValueError(f"self_correction_loss: label_clip must lie in (0, 1], but got {label_clip}")
    valid = pseudo_labels != ignore_index  # (B, H, W)
    count = valid.sum().clamp(min=1)  # all ignored: 0 / 1, still on the graph, no host sync
    log_probs = F.log_softmax(logits, dim=1)  # (B, C, H, W)
    safe_labels = torch.where(valid, pseudo_labels, torch.zeros_like(pseudo_labels))
    log_p_label = log_probs.gather(1, safe_labels[:, None])[:, 0]  # (B, H, W)
    cross_entropy = -log_p_label
    reverse_cross_entropy = -math.log(label_clip) * (1.0 - log_p_label.exp())
    weight = log_probs.max(dim=1).values.exp()  # (B, H, W) max softmax probability
    if detach_weight:
        weight = weight.detach()
    per_pixel = weight * cross_entropy + (1.0 - weight) * reverse_cross_entropy
    return (per_pixel * valid).sum() / count


# --------------------------------------------------------------------------------------------
# Distribution-specific batch normalisation (Sec. 3.2)
# --------------------------------------------------------------------------------------------


class DualBatchNorm2d(nn.Module):
    """Two BatchNorms side by side: ``normal`` (weak / clean images) and ``strong`` (the PBN).

    ``strong_from`` selects, during training only, which samples of a batch go through the strong
    BN: None (default) -> all through ``normal``; k -> samples ``k, k+1, ...`` through ``strong``
    and the first k through ``normal`` (each part with its own batch statistics, so one forward of
    ``cat([weak, strong])`` equals two separate forwards — the paper's Algorithm 1 line 8);
    0 -> all through ``strong``. In eval mode ``normal`` is *always* used, whatever
    ``strong_from`` says: the PBN is deprecated at test time.

    Each BN has its own affine parameters and running statistics; both start as copies of the
    original BN (the paper: "a parallel batch normalization initialized by the original BN").
    State-dict keys gain a ``normal.`` / ``strong.`` level; ``convert_from_dsbn`` removes it.

    A frozen ``normal`` (a BN that refuses train mode or whose affine parameters do not train,
    e.g. ``FrozenBatchNorm2d`` with ``frozen_bn: true``) would make a deep-copied PBN frozen too,
    and DSBN a no-op. So by default (``unfreeze_strong=True``) the PBN is then a plain, trainable
    ``nn.BatchNorm2d`` with the frozen BN's values: it normalises strong images with their batch
    statistics, tracks its own running statistics and trains its affine parameters, while the
    normal BN stays frozen. A BN that is not frozen is simply copied, whatever this flag says.
    """

    def __init__(self, normal: nn.BatchNorm2d, strong: nn.BatchNorm2d | None = None, *, unfreeze_strong: bool = True):
        super().__init__()
        self.normal = normal
        if strong is None:
            strong = _trainable_copy(normal) if unfreeze_strong and is_frozen_bn(normal) else copy.deepcopy(normal)
        self.strong = strong
        self.strong_from: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        split = self.strong_from
        if not self.training or split is None or split >= x.shape[0]:
            return self.normal(x)
        if split <= 0:
            return self.strong(x)
        return torch.cat([self.normal(x[:split]), self.strong(x[split:])])

    def extra_repr(self) -> str:
        return f"strong_from={self.strong_from}"


def is_frozen_bn(bn: nn.BatchNorm2d) -> bool:
    """True for a BN that cannot learn: it refuses train mode (always running statistics) or its
    affine parameters do not require gradients."""
    probe = copy.deepcopy(bn).train(True)
    frozen_affine = bn.affine and not (bn.weight.requires_grad or bn.bias.requires_grad)
    return not probe.training or frozen_affine


def _trainable_copy(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain ``nn.BatchNorm2d`` holding ``bn``'s values (affine and running statistics), trainable."""
    plain = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    state = bn.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if k in plain.state_dict()}, strict=False)
    like = next(iter(state.values()), None)
    return plain.to(like.device) if like is not None else plain


def convert_to_dsbn(module: nn.Module, *, unfreeze_strong: bool = True) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (subclasses included) by a ``DualBatchNorm2d``.

    The original BN becomes ``normal`` (same parameter objects) and a copy becomes ``strong``,
    so weights and running statistics start equal in both. A frozen BN's copy is a trainable
    ``nn.BatchNorm2d`` unless ``unfreeze_strong=False`` (see ``DualBatchNorm2d``); without that
    the PBN of a ``frozen_bn`` network would be frozen too and DSBN would do nothing. Works in
    place on children and returns the module (a new ``DualBatchNorm2d`` when ``module`` itself is
    a BatchNorm2d). Convert before building the optimizer, or the strong BNs' parameters will not
    be trained. Existing ``DualBatchNorm2d`` are left as they are.
    """
    if isinstance(module, nn.BatchNorm2d):
        return DualBatchNorm2d(module, unfreeze_strong=unfreeze_strong)
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm2d):
            continue
        replacement = convert_to_dsbn(child, unfreeze_strong=unfreeze_strong)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def check_strong_bn_trainable(model: nn.Module) -> None:
    """ValueError unless the model has DSBN layers and none of their strong BNs is frozen.

    For a config check: a frozen PBN never leaves its initial (normal-BN) state, so DSBN on/off
    would be the same network.
    """
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    if not duals:
        raise ValueError("DSBN: the model has no DualBatchNorm2d; call convert_to_dsbn(model) first")
    frozen = sum(is_frozen_bn(dual.strong) for dual in duals)
    if frozen:
        raise ValueError(
            f"DSBN: {frozen} of {len(duals)} strong BatchNorms are frozen (model built with frozen_bn: true and "
            "converted with unfreeze_strong=False), so DSBN would change nothing; convert with unfreeze_strong=True "
            "or set frozen_bn: false"
        )


def convert_from_dsbn(module: nn.Module) -> nn.Module:
    """Undo ``convert_to_dsbn``: each ``DualBatchNorm2d`` becomes its ``normal`` BN (the test-time
    network, loadable as a plain model). In place on children; returns the module."""
    if isinstance(module, DualBatchNorm2d):
        return module.normal
    for name, child in module.named_children():
        replacement = convert_from_dsbn(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def set_strong_bn(model: nn.Module, strong_from: int | None) -> int:
    """Set ``strong_from`` on every ``DualBatchNorm2d`` of ``model``; returns how many there are."""
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    for dual in duals:
        dual.strong_from = strong_from
    return len(duals)


@contextmanager
def use_strong_bn(model: nn.Module, from_index: int = 0) -> Iterator[nn.Module]:
    """Within the block, training forwards send samples ``from_index:`` through the strong BNs.

    ``with use_strong_bn(model): loss = ...(model(strong_batch))`` — all samples strong (the
    default, 0); ``with use_strong_bn(model, from_index=n_weak): model(cat([weak, strong]))`` —
    one forward of a mixed batch. Each BN's previous setting is restored on exit, exceptions
    included. Raises ValueError when the model has no ``DualBatchNorm2d`` (forgot
    ``convert_to_dsbn``), rather than silently training the normal BN on strong images.
    """
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    if not duals:
        raise ValueError("use_strong_bn: the model has no DualBatchNorm2d; call convert_to_dsbn(model) first")
    previous = [dual.strong_from for dual in duals]
    for dual in duals:
        dual.strong_from = from_index
    try:
        yield model
    finally:
        for dual, before in zip(duals, previous):
            dual.strong_from = before
