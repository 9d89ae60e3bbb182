"""U2PL (Wang et al., "Using Unreliable Pseudo-Labels"): entropy partition and memory-bank contrast.

* Reliable / unreliable partition (eqs. 6-7): pixel entropy of the teacher; the ``alpha_t``
  highest-entropy fraction is unreliable, ``alpha_t = alpha0 (1 - t / T)`` over epochs.
* Reliable pixels are pseudo labels (``reliable_pseudo_labels``, ``unsupervised_loss``).
* Unreliable pixels are negatives of a per-class contrastive loss: anchors from the student,
  the positive is the teacher's class centre in the batch, negatives come from a per-class memory
  bank of teacher features chosen by probability rank (``build_contrastive_samples``,
  ``contrastive_loss``, ``memory_bank_contrastive_loss``).

The EMA teacher lives in ``selftune.methods.common`` (``ema_update(..., parameters_only=True)`` +
``ema_decay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from selftune.methods.common import IGNORE_INDEX, all_gather_rows, masked_cross_entropy, zero_loss

__all__ = [
    "ClassMemoryBank",
    "ClassSamples",
    "alpha_schedule",
    "build_contrastive_samples",
    "class_ranks",
    "contrastive_entropy_masks",
    "contrastive_loss",
    "entropy",
    "entropy_reliable_mask",
    "memory_bank_contrastive_loss",
    "negative_candidate_mask",
    "percentile",
    "reliable_pseudo_labels",
    "unsupervised_loss",
]

ENTROPY_EPS = 1e-10  # the authors' guard in -sum p log(p + eps)


# --------------------------------------------------------------------------------------------
# Entropy partition (eqs. 6-7)
# --------------------------------------------------------------------------------------------


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Pixel entropy ``H = -sum_c p_c log(p_c + 1e-10)``: (B, C, H, W) probabilities -> (B, H, W).

    The 1e-10 is the authors' guard against log 0 (a zero probability contributes 0).
    """
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=1)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``np.percentile(values, q)`` with its default linear interpolation, as a 0-d tensor.

    values: any shape, flattened; q in [0, 100]. Position ``q/100 * (n - 1)`` in the sorted
    values, interpolated between its two neighbours. Uses ``kthvalue`` (no full sort and no
    ``torch.quantile`` size limit). Computed in float64.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must lie in [0, 100], but got q={q}")
    flat = values.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        raise ValueError("percentile: no values")
    position = q / 100.0 * (n - 1)
    below = int(position)  # floor, position >= 0
    above = min(below + 1, n - 1)
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(above + 1).values if above != below else low
    fraction = position - below
    if fraction >= 0.5:  # numpy's _lerp interpolates from the nearer end, which we copy exactly
        return high - (high - low) * (1.0 - fraction)
    return low + (high - low) * fraction


def alpha_schedule(alpha0: float, epoch: float, total_epochs: float) -> float:
    """Eq. 7: the unreliable fraction ``alpha_t = alpha0 * (1 - epoch / total_epochs)``.

    ``epoch`` counts from 0, so the first epoch uses alpha0 and the fraction reaches 0 at
    ``epoch = total_epochs`` (the authors update it once per epoch; alpha0 = 0.2 by default).
    """
    if total_epochs <= 0:
        raise ValueError(f"alpha_schedule: total_epochs must be > 0, but got {total_epochs}")
    if not 0.0 <= epoch <= total_epochs:
        raise ValueError(f"alpha_schedule: epoch must lie in [0, {total_epochs}], but got {epoch}")
    return alpha0 * (1.0 - epoch / total_epochs)


def entropy_reliable_mask(
    probs: torch.Tensor, alpha: float, ignore_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 6: True for the reliable pixels, ``H < percentile(H, 100 (1 - alpha))``.

    probs: (B, C, H, W) teacher probabilities; alpha: the unreliable fraction alpha_t in [0, 1];
    ignore_mask: optional bool (B, H, W), True where a pixel takes no part (padding, an ignored
    label). Returns bool (B, H, W); ignored pixels are never reliable.

    As in the authors' code the percentile is taken once over the non-ignored pixels of the
    whole batch (``np.percentile``, linear interpolation), and reliable means strictly below it,
    so about the lowest-entropy ``1 - alpha`` fraction is kept. (With alpha = 0 the threshold is
    the maximum entropy, so the pixels at the maximum are still dropped, as in the authors' code.)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"entropy_reliable_mask: alpha must lie in [0, 1], but got alpha={alpha}")
    pixel_entropy = entropy(probs)  # (B, H, W)
    valid = torch.ones_like(pixel_entropy, dtype=torch.bool) if ignore_mask is None else ~ignore_mask
    if not bool(valid.any()):
        return valid  # all False
    threshold = percentile(pixel_entropy[valid], 100.0 * (1.0 - alpha))
    return (pixel_entropy.to(torch.float64) < threshold) & valid


def reliable_pseudo_labels(
    probs: torch.Tensor,
    alpha: float,
    ignore_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Eq. 6: ``argmax p`` where the pixel is reliable, ``ignore_index`` elsewhere; (B, H, W) long."""
    reliable = entropy_reliable_mask(probs, alpha, ignore_mask)
    labels = probs.argmax(dim=1)
    return torch.where(reliable, labels, torch.full_like(labels, ignore_index))


def unsupervised_loss(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    authors_scaling: bool = False,
) -> torch.Tensor:
    """Eq. 8's L_u: cross-entropy of the student on the reliable pseudo labels.

    logits: (B, C, H, W) student; pseudo_labels: (B, H, W) from ``reliable_pseudo_labels``.
    Default: the mean over the kept pixels (the paper's ``lambda_u = B H W / N_kept`` times its
    sum over B H W). ``authors_scaling=True`` reproduces the authors' code, which multiplies that
    already-masked mean once more by ``B H W / N_kept`` (about 1.25x at alpha = 0.2).
    All pixels ignored -> 0 with the graph kept.
    """
    loss = masked_cross_entropy(logits, pseudo_labels, ignore_index)
    if authors_scaling:
        kept = (pseudo_labels != ignore_index).sum()
        if kept > 0:
            loss = loss * (pseudo_labels.numel() / kept)
    return loss


# --------------------------------------------------------------------------------------------
# Contrastive part: ranks, masks, memory bank, InfoNCE
# --------------------------------------------------------------------------------------------


def class_ranks(probs: torch.Tensor) -> torch.Tensor:
    """Rank of every class in each pixel's descending probability order: (B, C, H, W) long.

    Rank 0 is the most probable class (the paper's O_ij = argsort(p_ij)). Ties are broken by
    class index (stable sort), which is deterministic; the authors' unstable ``torch.sort`` may
    order exact ties either way.
    """
    order = probs.argsort(dim=1, descending=True, stable=True)  # order[:, r] = class at rank r
    return order.argsort(dim=1, stable=True)


def negative_candidate_mask(probs: torch.Tensor, cls: int, r_l: int, r_h: int) -> torch.Tensor:
    """The rank part of n^u_ij(c): True where class ``cls`` ranks in ``[r_l, r_h)``.

    probs: (B, C, H, W); returns bool (B, H, W). With the defaults r_l = 3, r_h = 20 a pixel is a
    negative candidate for c when c is not among its 3 most likely classes but among its 20 most
    likely (the pixel is probably not c, and not trivially so). Combine with the high-entropy
    mask for unlabelled pixels (``build_contrastive_samples`` does).
    """
    if not 0 <= r_l < r_h:
        raise ValueError(f"negative_candidate_mask: need 0 <= r_l < r_h, but got r_l={r_l}, r_h={r_h}")
    rank = class_ranks(probs)[:, cls]
    return (rank >= r_l) & (rank < r_h)


def contrastive_entropy_masks(
    probs: torch.Tensor, alpha: float, ignore_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-candidate (low) and negative-candidate (high) masks of unlabelled pixels.

    probs: (B, C, H, W) teacher probabilities; alpha: fraction in [0, 1] (the authors:
    ``low_entropy_threshold`` 20 % times ``1 - epoch / epochs``). low = ``H <= percentile(H, 100
    alpha)``, high = ``H >= percentile(H, 100 (1 - alpha))``, percentiles over the non-ignored
    pixels of the batch (as the authors' ``entropy[label_u != 255]``); ignored pixels are in
    neither. Returns two bool (B, H, W). For labelled images both masks are simply "label is not
    ignored" (the caller builds those).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"contrastive_entropy_masks: alpha must lie in [0, 1], but got alpha={alpha}")
    pixel_entropy = entropy(probs).to(torch.float64)
    valid = torch.ones_like(pixel_entropy, dtype=torch.bool) if ignore_mask is None else ~ignore_mask
    if not bool(valid.any()):
        return valid, valid.clone()
    kept = pixel_entropy[valid]
    low = (pixel_entropy <= percentile(kept, 100.0 * alpha)) & valid
    high = (pixel_entropy >= percentile(kept, 100.0 * (1.0 - alpha))) & valid
    return low, high


class ClassMemoryBank:
    """Per-class FIFO queues of feature vectors (teacher features of negative candidates).

    ``capacity`` keys per class (an int for all classes, or one per class: the authors keep
    30 000, and 50 000 for class 0). ``enqueue`` appends and, once full, drops the oldest keys,
    as the authors' ``dequeue_and_enqueue`` (concatenate, keep the last ``capacity``). Stored as
    one ring buffer per class, allocated on the first enqueue of that class, so a step costs the
    copy of the new keys only. Keys are stored detached; call ``to(device)`` to move the bank.

    Under DDP (a ``torch.distributed`` process group is initialised) ``enqueue`` gathers the keys
    of every worker, in rank order, before appending them, as the authors' ``concat_all_gather``
    does, so every worker holds the same bank (the workers may enqueue different numbers of
    keys). ``enqueue`` is then a collective: every worker must call it for the same classes in the
    same order (``build_contrastive_samples`` does, for every class, even with no key).
    ``gather=False`` keeps a per-worker bank.
    """

    def __init__(
        self,
        num_classes: int,
        capacity: int | Sequence[int],
        dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        gather: bool = True,
    ):
        capacities = [capacity] * num_classes if isinstance(capacity, int) else list(capacity)
        if len(capacities) != num_classes or min(capacities) < 1:
            raise ValueError(
                f"ClassMemoryBank: capacity must be a positive int or {num_classes} positive ints, got {capacity}"
            )
        self.num_classes, self.dim, self.capacities = num_classes, dim, capacities
        self.device, self.dtype = torch.device(device), dtype
        self.gather = gather
        self._buffers: list[torch.Tensor | None] = [None] * num_classes
        self._next = [0] * num_classes  # ring position of the next write
        self._size = [0] * num_classes

    def __len__(self) -> int:
        return self.num_classes

    def size(self, cls: int) -> int:
        """Number of keys held for class ``cls``."""
        return self._size[cls]

    def enqueue(self, cls: int, keys: torch.Tensor) -> None:
        """Append keys (n, dim) to class ``cls``; beyond capacity the oldest keys are dropped.

        Under DDP (and ``gather``) the keys of all workers are appended, rank 0's first.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"ClassMemoryBank.enqueue: keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        capacity = self.capacities[cls]
        keys = keys.detach()[-capacity:].to(dtype=self.dtype)  # only the newest can survive
        if self.gather:
            keys = all_gather_rows(keys)[-capacity:]
        keys = keys.to(self.device)
        n = keys.shape[0]
        if n == 0:
            return
        if self._buffers[cls] is None:
            self._buffers[cls] = torch.empty(capacity, self.dim, device=self.device, dtype=self.dtype)
        slots = (self._next[cls] + torch.arange(n, device=self.device)) % capacity
        self._buffers[cls][slots] = keys  # type: ignore[index]
        self._next[cls] = (self._next[cls] + n) % capacity
        self._size[cls] = min(self._size[cls] + n, capacity)

    def keys(self, cls: int) -> torch.Tensor:
        """The keys of class ``cls``, oldest first: (size, dim) (a copy)."""
        buffer, size = self._buffers[cls], self._size[cls]
        if buffer is None or size == 0:
            return torch.empty(0, self.dim, device=self.device, dtype=self.dtype)
        if size < self.capacities[cls]:
            return buffer[:size].clone()
        start = self._next[cls]  # when full, the next write position holds the oldest key
        return torch.cat([buffer[start:], buffer[:start]])

    def sample(self, cls: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` keys of class ``cls`` drawn uniformly with replacement: (count, dim)."""
        size = self._size[cls]
        if size == 0:
            raise ValueError(f"ClassMemoryBank.sample: class {cls} holds no keys")
        index = torch.randint(size, (count,), generator=generator, device=_generator_device(generator))
        return self._buffers[cls][index.to(self.device)]  # type: ignore[index]

    def to(self, device: torch.device | str) -> ClassMemoryBank:
        """Move every stored key to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        self._buffers = [None if b is None else b.to(self.device) for b in self._buffers]
        return self


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def contrastive_loss(
    anchors: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Eq. 4 (InfoNCE): ``CE([cos(a, p), cos(a, n_1), ..., cos(a, n_N)] / tau, target 0)``.

    anchors: (Q, D); positive: (D,) or (Q, D); negatives: (Q, N, D). Cosine similarities, divided
    by the temperature (the authors: 0.5), cross-entropy with the positive at index 0, mean over
    the Q anchors. Returns a scalar; gradients reach whatever inputs carry them (in U2PL only the
    anchors, which are student features).
    """
    if temperature <= 0:
        raise ValueError(f"contrastive_loss: temperature must be > 0, but got {temperature}")
    queries = anchors.shape[0]
    positive = positive.expand(queries, -1) if positive.dim() == 1 else positive
    keys = torch.cat([positive[:, None], negatives], dim=1)  # (Q, 1 + N, D)
    logits = F.cosine_similarity(anchors[:, None], keys, dim=2) / temperature  # (Q, 1 + N)
    target = torch.zeros(queries, dtype=torch.long, device=anchors.device)
    return F.cross_entropy(logits, target)


@dataclass
class ClassSamples:
    """One class's share of the contrastive loss.

    anchors (Q, D) student features (with gradient), positive (D,) the teacher's class centre,
    negatives (Q, N, D) teacher features from the memory bank (both without gradient).
    """

    cls: int
    anchors: torch.Tensor
    positive: torch.Tensor
    negatives: torch.Tensor


def build_contrastive_samples(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    labelled: torch.Tensor,
    memory_bank: ClassMemoryBank,
    *,
    delta_p: float = 0.3,
    r_l: int = 3,
    r_h: int = 20,
    num_queries: int = 256,
    num_negatives: int = 50,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[list[ClassSamples], int]:
    """Per-class anchors, positive and negatives of U2PL's contrastive loss; fills the memory bank.

    Inputs at the feature resolution (nearest-resize labels and masks first, see
    ``common.resize_labels``): student_features, teacher_features (B, D, h, w); teacher_probs
    (B, C, h, w); labels (B, h, w) long — ground truth for labelled images, the teacher's pseudo
    labels for unlabelled ones, ``ignore_index`` where none; low_mask / high_mask bool (B, h, w)
    — for labelled images "label not ignored", for unlabelled ones the masks of
    ``contrastive_entropy_masks``; labelled bool (B,).

    For every class c, following the authors' ``compute_contra_memobank_loss``:
    * candidates: ``low_mask & labels == c``; a class with any candidate is *valid*;
    * anchors: candidates with teacher ``p_c > delta_p``; ``num_queries`` student features drawn
      with replacement;
    * positive: mean teacher feature over the candidates (the class centre of this batch);
    * negatives: teacher features of pixels in ``high_mask`` whose rank of c is in ``[r_l, r_h)``
      (unlabelled images) or ``< r_l`` with ``labels != c`` (labelled images) — the paper's
      n_ij(c). They are enqueued into bank[c] first, then ``num_queries * num_negatives`` keys
      are drawn with replacement from bank[c].
    A valid class whose anchors or bank are empty contributes no sample but still counts.

    Two deliberate departures from the literal code, both bugs there: (1) the code also ANDs the
    negatives with ``labels == c`` (its ``high_valid_pixel`` is one-hot label x high mask), which
    empties the labelled negatives outright (open issue #171) and nearly all unlabelled ones; we
    use the paper's definition, which is also what its comments describe. (2) The code reads the
    i-th *valid* class's anchors and centre from class i's lists (index mismatch once a class is
    missing); here every quantity belongs to the same class.

    Returns (samples, num_valid_classes); feed both to ``memory_bank_contrastive_loss``.
    """
    batch, dim = student_features.shape[:2]
    num_classes = teacher_probs.shape[1]
    if memory_bank.num_classes != num_classes or memory_bank.dim != dim:
        raise ValueError(
            f"memory bank is for {memory_bank.num_classes} classes x {memory_bank.dim} dims, "
            f"but the inputs have {num_classes} classes x {dim} dims"
        )
    student = student_features.permute(0, 2, 3, 1)  # (B, h, w, D)
    teacher = teacher_features.detach().permute(0, 2, 3, 1)  # (B, h, w, D)
    probs = teacher_probs.detach()
    ranks = class_ranks(probs)  # (B, C, h, w)
    is_labelled = labelled.to(torch.bool).view(batch, 1, 1)

    samples: list[ClassSamples] = []
    num_valid = 0
    for cls in range(num_classes):
        of_class = labels == cls  # (B, h, w)
        candidates = low_mask & of_class
        rank = ranks[:, cls]
        negative = high_mask & torch.where(
            is_labelled, (rank < r_l) & ~of_class & (labels != ignore_index), (rank >= r_l) & (rank < r_h)
        )
        memory_bank.enqueue(cls, teacher[negative])
        if not bool(candidates.any()):
            continue
        num_valid += 1
        anchor_pool = student[candidates & (probs[:, cls] > delta_p)]  # (n_a, D)
        if anchor_pool.shape[0] == 0 or memory_bank.size(cls) == 0:
            continue
        positive = teacher[candidates].mean(dim=0)  # (D,)
        samples.append(_draw_class_samples(cls, anchor_pool, positive, memory_bank, num_queries, num_negatives, generator))
    return samples, num_valid


def _draw_class_samples(
    cls: int, anchor_pool: torch.Tensor, positive: torch.Tensor, memory_bank: ClassMemoryBank,
    num_queries: int, num_negatives: int, generator: torch.Generator | None,
) -> ClassSamples:
    """``num_queries`` anchors from ``anchor_pool`` (n_a, D) and ``num_negatives`` keys per anchor
    from bank[cls], both drawn with replacement as in the authors' code."""
    pick = torch.randint(anchor_pool.shape[0], (num_queries,), generator=generator, device=_generator_device(generator))
    anchors = anchor_pool[pick.to(anchor_pool.device)]  # (Q, D)
    negatives = memory_bank.sample(cls, num_queries * num_negatives, generator)
    negatives = negatives.to(anchors.device, anchors.dtype).view(num_queries, num_negatives, anchor_pool.shape[1])
    return ClassSamples(cls, anchors, positive, negatives)


def memory_bank_contrastive_loss(
    samples: list[ClassSamples], num_valid_classes: int, temperature: float, like: torch.Tensor
) -> torch.Tensor:
    """U2PL's contrastive term: ``sum_c contrastive_loss(c) / num_valid_classes``.

    ``samples`` and ``num_valid_classes`` from ``build_contrastive_samples``; ``like`` is the
    student feature map, so that the "no loss" cases stay connected to the graph. As in the
    authors' code the loss is 0 when fewer than two classes are valid in the batch.
    """
    if num_valid_classes <= 1 or not samples:
        return zero_loss(like)
    total = sum(contrastive_loss(s.anchors, s.positive, s.negatives, temperature) for s in samples)
    return total / num_valid_classes + zero_loss(like)
