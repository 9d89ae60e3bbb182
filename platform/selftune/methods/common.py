"""Tensor helpers that several methods share: the EMA teacher, masked cross-entropy, resizing labels,
CutMix on a batch, and gathering variable-length rows across DDP workers.

Everything here is a plain function of tensors (or of two modules, for the EMA); no training loop,
no I/O.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "all_gather_rows",
    "apply_cutmix",
    "box_mask",
    "class_weighted_cross_entropy",
    "cutmix_boxes",
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


# --------------------------------------------------------------------------------------------
# CutMix (U2PL's strong perturbation of the student's unlabelled input)
# --------------------------------------------------------------------------------------------


def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    p: float = 0.5,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CutMix box per image, drawn as U2PL's authors do; returns ``(box, partner)``.

    box: bool (B, H, W), True where image i takes the pixels of image ``partner[i]``;
    partner: long (B,), ``(i + 1) mod B`` (the authors' choice: the next image of the batch).
    With probability ``1 - p`` the whole batch is left unmixed (box all False): the authors
    decide once per batch, p = 0.5. Each box covers half the image (the authors'
    ``generate_cutout_mask`` with ratio 2): its width is uniform in ``[W // 2 + 1, W - 1]``,
    its height ``round(H W / 2 / width)``, its corner uniform over the positions that keep it
    inside the image. Random numbers come from ``generator`` (on its device), then move to
    ``device``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix_boxes: p must lie in [0, 1], but got p={p}")
    if batch_size < 1 or height < 1 or width < 1:
        raise ValueError(f"cutmix_boxes: need a positive batch and image size, got {batch_size}x{height}x{width}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else gen_device
    partner = (torch.arange(batch_size, device=device) + 1) % batch_size
    mix = bool(torch.rand((), generator=generator, device=gen_device) < p)
    if not mix:
        return torch.zeros(batch_size, height, width, dtype=torch.bool, device=device), partner
    low = width // 2 + 1
    box_w = torch.randint(low, max(width, low + 1), (batch_size,), generator=generator, device=gen_device)
    box_w = box_w.clamp(max=width)
    box_h = torch.round(height * width / 2 / box_w.double()).long().clamp(1, height)
    uniform = torch.rand(batch_size, 2, generator=generator, device=gen_device, dtype=torch.float64)
    x0 = (uniform[:, 0] * (width - box_w + 1)).floor().long()
    y0 = (uniform[:, 1] * (height - box_h + 1)).floor().long()
    return box_mask(x0, y0, box_w, box_h, height, width).to(device), partner


def box_mask(
    x0: torch.Tensor, y0: torch.Tensor, box_w: torch.Tensor, box_h: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """bool (B, H, W): True inside each image's box ``[y0, y0 + h) x [x0, x0 + w)`` (all (B,) long)."""
    rows = torch.arange(height, device=x0.device)[None, :, None]
    cols = torch.arange(width, device=x0.device)[None, None, :]
    inside_rows = (rows >= y0[:, None, None]) & (rows < (y0 + box_h)[:, None, None])
    inside_cols = (cols >= x0[:, None, None]) & (cols < (x0 + box_w)[:, None, None])
    return inside_rows & inside_cols


def apply_cutmix(tensor: torch.Tensor, box: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Paste ``tensor[partner[i]]`` into sample i inside ``box[i]``: images (B, C, H, W), labels
    or masks (B, H, W), any dtype.

    Use the same ``(box, partner)`` for the image, the teacher's pseudo labels and every mask
    that goes with them (padding, reliability), so that each pixel keeps its own target.
    Gradients flow to both sources.
    """
    batch, height, width = box.shape
    if tensor.shape[0] != batch or tuple(tensor.shape[-2:]) != (height, width):
        raise ValueError(f"apply_cutmix: tensor {tuple(tensor.shape)} does not match the boxes {tuple(box.shape)}")
    where = box.to(tensor.device).view(batch, *([1] * (tensor.dim() - 3)), height, width)
    return torch.where(where, tensor[partner.to(tensor.device)], tensor)


# --------------------------------------------------------------------------------------------
# DDP: gather rows of different counts from every worker
# --------------------------------------------------------------------------------------------


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows`` (n_r, ...) of every worker in rank order; ``rows`` itself without a
    process group.

    The counts may differ between workers (each pads to the largest, then trims). Every worker
    must call it, in the same order (it is a collective). Under NCCL the rows travel through the
    current CUDA device; the result is detached, on ``rows``' device and dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = rows.detach().to(device)
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)]).to(rows.device)
