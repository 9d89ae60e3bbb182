"""DST-CBC (Feng et al.): dynamic self-training loss and class-balanced curriculum pseudo labels.

* ``dynamic_self_training_loss``: eqs. 1-2, cross-entropy on pseudo labels weighted per pixel by
  the *current* model's probability of the pseudo label to the power gamma.
* ``class_balanced_thresholds`` + ``class_balanced_pseudo_labels``: Algorithm 1 / eq. 6, keep the
  top alpha fraction of each predicted class. The thresholds (a batch's, the authors' numpy
  reference, and the compact per-image sample a labelling pass over a dataset streams over) live
  in ``selftune.methods.dst_cbc_thresholds`` and are re-exported here.

The alpha curriculum over rounds (0.2, 0.4, ..., 1.0) is a ``selftune.schedules`` spec:
``{"shape": "linear", "start": 0.2, "end": 1.0}`` over 5 rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftune.methods.common import IGNORE_INDEX, masked_cross_entropy
from selftune.methods.dst_cbc_thresholds import (
    class_balanced_thresholds,
    class_balanced_thresholds_from_sample,
    class_balanced_thresholds_reference,
    sample_confidences,
    valid_pixels,
)

__all__ = [
    "class_balanced_pseudo_labels",
    "class_balanced_thresholds",
    "class_balanced_thresholds_from_sample",
    "class_balanced_thresholds_reference",
    "dynamic_self_training_loss",
    "dynamic_self_training_terms",
    "dynamic_weights",
    "sample_confidences",
    "valid_pixels",
]


# --------------------------------------------------------------------------------------------
# Dynamic self-training loss (eqs. 1-2)
# --------------------------------------------------------------------------------------------


def _target_log_prob(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p[target] (B, H, W) with graph, valid mask (B, H, W)); ignored pixels gather class 0."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_probs = F.log_softmax(logits, dim=1)  # (B, C, H, W)
    return log_probs.gather(1, safe_target[:, None])[:, 0], valid


def dynamic_weights(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    gamma: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Eq. 2: ``omega = p_cur[pseudo label] ** gamma`` per pixel, detached; 0 at ignored pixels.

    logits: (B, C, H, W) of the model being trained; pseudo_labels: (B, H, W) long.
    Returns (B, H, W) float without gradient. Computed as ``exp(gamma * log p)``, which is exact
    for gamma = 0 (weight 1) and does not underflow before the power is taken.
    """
    with torch.no_grad():
        log_p, valid = _target_log_prob(logits.detach(), pseudo_labels, ignore_index)
        return torch.exp(gamma * log_p) * valid


def dynamic_self_training_loss(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    gamma: float,
    ignore_index: int = IGNORE_INDEX,
    weight_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eqs. 1-2: ``sum(omega * CE) / #non-ignored pixels`` with ``omega = p_cur[y]^gamma``.

    logits: (B, C, H, W) raw scores of the current model; pseudo_labels: (B, H, W) long, with
    ``ignore_index`` where a pixel carries no label. ``p_cur[y]`` is the softmax probability the
    current model gives the label, recomputed on the fly and detached (the weight is not
    back-propagated through, as in the paper and the authors' code).

    weight_mask: which labels are pseudo labels and get the dynamic weight — bool, (B,) per image
    or (B, H, W) per pixel; False marks ground-truth labels, which weigh 1. The authors train on
    one batch ``cat([pseudo-labelled, labelled])`` and weight only the pseudo-labelled images, i.e.
    ``weight_mask = torch.arange(B) < n_pseudo``. None: every label is a pseudo label.

    Normalisation follows the authors' code (the paper writes an unnormalised sum): divide by the
    number of non-ignored pixels in the whole batch, *not* by the sum of the weights, so a large
    gamma shrinks the pseudo-label term. gamma = 0 is exactly the masked-mean cross-entropy
    (``F.cross_entropy(..., ignore_index=ignore_index)``). Every pixel ignored -> 0, graph kept.
    """
    if gamma < 0:
        raise ValueError(f"dynamic_self_training_loss: gamma must be >= 0, but got gamma={gamma}")
    log_p, valid = _target_log_prob(logits, pseudo_labels, ignore_index)  # (B, H, W)
    count = valid.sum().clamp(min=1)  # all ignored: 0 / 1, still on the graph, no host sync
    weights = torch.exp(gamma * log_p.detach())  # p^gamma, (B, H, W), no gradient
    if weight_mask is not None:
        dynamic = _broadcast_mask(weight_mask, pseudo_labels.shape)
        weights = torch.where(dynamic, weights, torch.ones_like(weights))
    cross_entropy = -log_p * valid  # (B, H, W), 0 at ignored pixels
    return (weights * cross_entropy).sum() / count


def dynamic_self_training_terms(
    logits: torch.Tensor, targets: torch.Tensor, n_labelled: int, gamma: float, ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the authors' loss on one batch of labelled then pseudo-labelled images.

    logits: (B, C, H, W); targets: (B, H, W), ground truth for the first ``n_labelled`` images,
    pseudo labels for the rest. Returns ``(seg, pseudo)``: the labelled CE and the dynamically
    weighted pseudo-label CE, both over the one shared denominator of the authors' ``DynamicLoss``
    (the non-ignored pixels of the whole batch), so ``seg + pseudo`` equals
    ``dynamic_self_training_loss(logits, targets, gamma, weight_mask=arange(B) >= n_labelled)``
    while each term can be logged. Each part is computed as its own masked mean and rescaled to the
    shared denominator (the order of operations the pipelines' results were measured with).
    """
    n = n_labelled
    count_l = (targets[:n] != ignore_index).sum()
    count_u = (targets[n:] != ignore_index).sum()
    total = (count_l + count_u).clamp(min=1)
    seg = masked_cross_entropy(logits[:n], targets[:n], ignore_index) * (count_l.clamp(min=1) / total)
    pseudo = dynamic_self_training_loss(logits[n:], targets[n:], gamma, ignore_index) * (count_u.clamp(min=1) / total)
    return seg, pseudo


def _broadcast_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (B,) or (B, H, W) bool mask as (B, H, W)."""
    mask = mask.to(torch.bool)
    if mask.dim() == 1:
        if mask.shape[0] != shape[0]:
            raise ValueError(f"weight_mask has {mask.shape[0]} entries but the batch has {shape[0]} images")
        return mask.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    if mask.shape != shape:
        raise ValueError(f"weight_mask must be (B,) or {tuple(shape)}, but got {tuple(mask.shape)}")
    return mask


def class_balanced_pseudo_labels(
    probs: torch.Tensor,
    thresholds: torch.Tensor,
    global_threshold: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Algorithm 1 lines 13-18 + eq. 6: class-balanced pseudo labels, ``ignore_index`` if not kept.

    probs: (B, C, H, W) softmax probabilities; thresholds: (C,) from ``class_balanced_thresholds``.
    Returns (B, H, W) long.

    Rule of the authors' successor code (DMT): ``label = argmax p``, kept when
    ``max p >= thresholds[label]``. (The original DST-CBC code used ``argmax_c p_c / t_c``, which
    can pick a non-argmax class; its author called that wrong.) ``global_threshold`` T (eq. 6)
    additionally requires ``max p > T`` — strict, as eq. 6 and the authors' fixed-threshold
    ablation write it. None: no global threshold (the paper's main setting).
    """
    if thresholds.shape != (probs.shape[1],):
        raise ValueError(
            f"thresholds must be ({probs.shape[1]},) for {probs.shape[1]} classes, got {tuple(thresholds.shape)}"
        )
    confidence, labels = probs.max(dim=1)  # (B, H, W) each
    keep = confidence >= thresholds.to(confidence.device, confidence.dtype)[labels]
    if global_threshold is not None:
        keep &= confidence > global_threshold
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))
