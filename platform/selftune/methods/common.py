"""Tensor helpers that several methods share: the EMA teacher, masked cross-entropy, resizing labels.

Everything here is a plain function of tensors (or of two modules, for the EMA); no training loop,
no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "class_weighted_cross_entropy",
    "ema_decay",
    "ema_update",
    "masked_cross_entropy",
    "resize_labels",
    "zero_loss",
]

IGNORE_INDEX = 255
"""Label value of a pixel that is not labelled; the same value as ``selftune.data.IGNORE_INDEX``
(repeated here so the methods stay importable without the data stack)."""


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is still connected to ``like``'s graph.

    Returned when a loss has nothing to average (U2PL's contrastive term with < 2 classes), so that
    ``loss.backward()`` works and DDP sees a gradient (of zeros) for every parameter it used.
    """
    return like.sum() * 0.0


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ``ignore_index``.

    logits: (B, C, H, W); target: (B, H, W) long. Returns a scalar. Equals
    ``F.cross_entropy(logits, target, ignore_index=ignore_index)`` except that a batch with every
    pixel ignored gives 0 (still on the graph) instead of NaN, without a host sync.
    """
    count = (target != ignore_index).sum().clamp(min=1)  # no host sync: 0 / 1 when all are ignored
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / count


def class_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Class-weighted cross-entropy ``sum w_y CE / sum w_y`` over the non-ignored pixels.

    logits: (B, C, H, W); target: (B, H, W) long; class_weights: (C,) (e.g.
    ``auxnet.enet_class_weights``). The normalisation by the summed weights of the targets is
    ``F.cross_entropy(weight=...)``'s (and ENet's weighted criterion's); every pixel ignored -> 0
    with the graph kept.
    """
    weight = class_weights.to(logits.device, logits.dtype)
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    norm = weight[torch.where(valid, target, torch.zeros_like(target))][valid].sum()
    return total / norm.clamp(min=torch.finfo(norm.dtype).tiny)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map (B, H, W) -> (B, h, w), values kept as they are.

    Used to bring labels or masks to a feature map's resolution (U2PL's contrastive loss) without
    inventing classes at region borders. Bool masks stay bool.
    """
    if labels.shape[-2:] == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return resized.to(labels.dtype)


def ema_decay(step: int, max_decay: float) -> float:
    """U2PL's EMA momentum ``min(1 - 1 / (step + 1), max_decay)``.

    ``step`` counts teacher updates from 0: step 0 gives 0 (the teacher becomes a copy of the
    student), then the momentum warms up towards ``max_decay`` (0.99 in U2PL). In the authors'
    code ``step`` restarts at 0 after the supervised-only epochs.
    """
    if step < 0:
        raise ValueError(f"ema_decay: step must be >= 0, but got step={step}")
    if not 0.0 <= max_decay <= 1.0:
        raise ValueError(f"ema_decay: max_decay must lie in [0, 1], but got max_decay={max_decay}")
    return min(1.0 - 1.0 / (step + 1), max_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, *, parameters_only: bool = False) -> None:
    """Move the teacher towards the student in place: ``t <- decay * t + (1 - decay) * s``.

    By default every floating-point entry of the state dict is averaged, parameters *and* buffers
    (BatchNorm running mean / var), as the three-stage authors' mean teacher does; integer buffers
    (``num_batches_tracked``) are copied from the student. ``parameters_only=True`` averages the
    parameters and leaves every buffer alone, as U2PL does (its teacher updates its own BN
    statistics by running in train mode).

    The two modules must have the same state-dict keys and shapes (the teacher is normally a
    ``copy.deepcopy`` of the student).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must lie in [0, 1], but got decay={decay}")
    if parameters_only:
        pairs = list(zip(teacher.named_parameters(), student.named_parameters()))
    else:
        teacher_state, student_state = teacher.state_dict(), student.state_dict()
        if teacher_state.keys() != student_state.keys():
            missing = sorted(set(student_state) ^ set(teacher_state))
            raise ValueError(f"ema_update: teacher and student state dicts differ in keys, e.g. {missing[:3]}")
        pairs = [((key, teacher_state[key]), (key, student_state[key])) for key in teacher_state]
    for (name, t), (student_name, s) in pairs:
        if name != student_name or t.shape != s.shape:
            raise ValueError(
                f"ema_update: teacher {name} {tuple(t.shape)} does not match student {student_name} {tuple(s.shape)}"
            )
        if t.is_floating_point():
            t.lerp_(s.detach().to(t.dtype), 1.0 - decay)  # t + (1 - decay) * (s - t)
        else:
            t.copy_(s)
