"""DST-CBC's class-balanced thresholds (Algorithm 1, lines 1-12): per predicted class, the
confidence of its top alpha fraction of pixels.

* ``class_balanced_thresholds``: on one batch's confidences and predictions, by a radix selection
  on the float bits (exact, no sort). ``class_balanced_thresholds_reference`` is the authors'
  numpy procedure, kept for benchmarks and as the test oracle of the fast version.
* ``sample_confidences`` + ``class_balanced_thresholds_from_sample``: the same thresholds for a
  labelling pass over a whole dataset, with memory bounded by the compact sample itself: each
  batch leaves only its own every-n-th pixel (float32 confidence + uint8 class, 5 bytes), and the
  selection streams over that sample in fixed-size blocks.

``selftune.methods.dst_cbc`` re-exports these with the rest of the method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "class_balanced_thresholds",
    "class_balanced_thresholds_from_sample",
    "class_balanced_thresholds_reference",
    "sample_confidences",
    "valid_pixels",
]


# --------------------------------------------------------------------------------------------
# Class-balanced thresholds (Algorithm 1, lines 1-12)
# --------------------------------------------------------------------------------------------

# Radix digits over the 32 bits of an order-preserving integer image of a float32: three passes
# at most, after which the candidates left in each class have bit-identical confidences.
_DIGITS = ((18, 14), (8, 10), (0, 8))  # (shift, width)


def _ordered_int32(values: torch.Tensor) -> torch.Tensor:
    """int32 whose signed order equals the float order of ``values`` (float32, no NaN).

    Non-negative floats already order like their bit patterns; for negative ones the 31 value
    bits are flipped. (-0.0 lands just below +0.0, which no comparison ``p >= t`` can notice.)
    """
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest_bits(
    keys: torch.Tensor, classes: torch.Tensor, k: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Radix selection of each class's k-th largest key.

    keys: (M,) int32 from ``_ordered_int32``; classes: (M,) int32; k: (C,) int64, 1-based rank
    from the top (0 for a class with no element). Per digit: histogram (class, digit), find the
    bucket that holds each class's k-th largest, keep only that bucket and shift k by the number
    of elements in higher buckets. One ``bincount`` pass per digit, O(M).

    Returns (candidates, k_left): ``candidates`` indexes ``keys``; for class c the candidates all
    carry the k[c]-th largest key of class c, and ``k_left[c]`` is the rank among them (1-based,
    from the top) of the k[c]-th largest element: ``k[c] - k_left[c]`` elements of c are larger.
    """
    device = keys.device
    alive: torch.Tensor | None = None  # indices into ``keys`` of the elements still in the race
    cur_keys, cur_classes = keys, classes
    active = k > 0
    for shift, width in _DIGITS:
        radix = 1 << width
        if shift + width == 32:  # top digit of a signed int: [-2^(w-1), 2^(w-1)) -> [0, 2^w)
            digit = (cur_keys >> shift) + (radix >> 1)
        else:
            digit = (cur_keys >> shift) & (radix - 1)
        flat = digit.add_(cur_classes * radix)  # (M',) int32 bucket id = class * R + digit
        hist = torch.bincount(flat, minlength=num_classes * radix).view(num_classes, radix)
        at_least = hist.flip(1).cumsum(1).flip(1)  # (C, R): elements whose digit >= r
        bucket = ((at_least >= k[:, None]).sum(1) - 1).clamp(min=0)  # last r with at_least >= k
        higher = at_least.gather(1, (bucket + 1).clamp(max=radix - 1)[:, None])[:, 0]
        higher = torch.where(bucket + 1 < radix, higher, torch.zeros_like(higher))
        k = torch.where(active, k - higher, k)
        wanted = torch.arange(num_classes, device=device) * radix + bucket
        wanted = torch.where(active, wanted, torch.full_like(wanted, -1)).to(torch.int32)
        keep = torch.nonzero(flat == wanted[cur_classes]).flatten()  # (M'',)
        alive = keep if alive is None else alive[keep]
        cur_keys, cur_classes = cur_keys[keep], cur_classes[keep]
    assert alive is not None
    return alive, k


def class_balanced_thresholds(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    num_classes: int,
    alpha: float,
    *,
    sample_every: int = 1,
) -> torch.Tensor:
    """Per-class confidence thresholds that keep the top ``alpha`` fraction of each class.

    confidence: max softmax probability per pixel, any shape (e.g. (N, H, W)), floating;
    prediction: argmax class per pixel, same shape, long in [0, num_classes).
    Returns thresholds (num_classes,) in confidence's dtype; a pixel predicted as c is kept when
    ``confidence >= thresholds[c]`` (see ``class_balanced_pseudo_labels``).

    The rule is the authors' code (Algorithm 1 line 12 of the paper indexes ``r[alpha * n]`` of an
    ascending sort, which read literally keeps the *bottom*): confidences are flattened in memory
    order and every ``sample_every``-th one is kept (the authors use 16, i.e. 6.25 % of the
    pixels; the paper says 5-10 % is enough); for a class with n sampled pixels the threshold is
    the ``k``-th largest sampled value with ``k = min(int(n * alpha) + 1, n)``. Ties count once
    per pixel, so with ``p >= t`` every pixel tied with the k-th value is also kept: about
    ``int(n * alpha) + 1`` sampled pixels pass, one more than "top alpha".

    Edge cases: ``alpha = 1`` gives ``-inf`` for every class, so every pixel is kept (the authors
    use 1e-4, which keeps every softmax maximum as max >= 1/C); ``alpha = 0`` keeps the most
    confident sampled value of each class (and its ties); a class with no sampled pixel gets
    ``+inf`` and keeps nothing (the authors' code crashes on an empty class).

    Speed: no sort. An exact radix selection on the float32 bit patterns takes three histogram
    passes (``torch.bincount``) over the sampled pixels, so the cost is linear in the number of
    pixels for any number of classes, on CPU or GPU, and a mass of identical confidences (softmax
    saturating at 1.0) costs nothing extra. float64 confidences are ranked at float32 precision
    and the tie among values that share a float32 image is broken exactly by a sort of those few.
    """
    _check_threshold_inputs(confidence, prediction, alpha, sample_every)
    dtype, device = confidence.dtype, confidence.device
    if alpha >= 1.0:
        return torch.full((num_classes,), -math.inf, dtype=dtype, device=device)
    conf = confidence.reshape(-1)[::sample_every].contiguous()  # (M,)
    pred = prediction.reshape(-1)[::sample_every].to(torch.int32).contiguous()  # (M,)
    thresholds = torch.full((num_classes,), math.inf, dtype=dtype, device=device)
    if conf.numel() == 0:
        return thresholds
    if num_classes * (1 << max(width for _, width in _DIGITS)) >= 2**31:
        raise ValueError(f"class_balanced_thresholds: num_classes={num_classes} is too large")
    if bool(torch.isnan(conf).any()):
        raise ValueError("class_balanced_thresholds: confidence holds NaN")
    counts = _pixels_per_class(pred, num_classes)  # (C,) sampled pixels per class

    # int(n * alpha) in float64, exactly as Python's int(len(r) * alpha) in the authors' code.
    k = torch.minimum(torch.floor(counts.to(torch.float64) * alpha).to(torch.int64) + 1, counts)
    keys = _ordered_int32(conf if dtype == torch.float32 else conf.to(torch.float32))
    candidates, k_left = _kth_largest_bits(keys, pred, k, num_classes)
    chosen_conf, chosen_pred = conf[candidates], pred[candidates].to(torch.int64)
    if dtype != torch.float64:
        # float32 and narrower: a class's candidates are one and the same value; take any.
        thresholds.index_put_((chosen_pred,), chosen_conf)
        return thresholds
    present = counts > 0
    thresholds[present] = _kth_largest_exact(chosen_conf, chosen_pred, k_left, present)
    return thresholds


def _check_threshold_inputs(confidence: torch.Tensor, prediction: torch.Tensor, alpha: float, sample_every: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"class_balanced_thresholds: alpha must lie in [0, 1], but got alpha={alpha}")
    if sample_every < 1:
        raise ValueError(f"class_balanced_thresholds: sample_every must be >= 1, but got {sample_every}")
    if confidence.shape != prediction.shape:
        raise ValueError(
            f"confidence {tuple(confidence.shape)} and prediction {tuple(prediction.shape)} must have the same shape"
        )
    if not confidence.is_floating_point():
        raise ValueError(f"confidence must be a floating tensor, but got {confidence.dtype}")


def _pixels_per_class(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) counts of ``pred``; a class outside 0..C-1 is an error naming it."""
    try:
        counts = torch.bincount(pred, minlength=num_classes)
    except RuntimeError:  # negative values
        counts = torch.empty(0)
    if counts.numel() != num_classes:
        low, high = int(pred.min()), int(pred.max())
        raise ValueError(f"prediction holds class {low if low < 0 else high} but classes are 0..{num_classes - 1}")
    return counts


def _kth_largest_exact(values: torch.Tensor, classes: torch.Tensor, k: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The ``k[c]``-th largest of class c's ``values`` for each ``present`` class c (float64
    candidates that share a float32 image but may differ), in class order."""
    # Group by class with ascending values inside: the k-th largest of class c sits k from its end.
    ascending, order = torch.sort(values)
    by_class, regroup = torch.sort(classes[order], stable=True)
    end = torch.bincount(by_class, minlength=len(present)).cumsum(0)
    return ascending[regroup][(end - k)[present]]


def class_balanced_thresholds_reference(
    confidence: np.ndarray,
    prediction: np.ndarray,
    num_classes: int,
    alpha: float,
    *,
    sample_every: int = 16,
) -> np.ndarray:
    """The authors' threshold procedure in numpy, for benchmarks and as the tests' oracle.

    Same inputs and result as ``class_balanced_thresholds`` (numpy arrays instead of tensors):
    flatten, keep every ``sample_every``-th value, ``np.sort`` each class's values ascending and
    take ``sorted[-int(n * alpha) - 1]``. The authors' special cases are replaced by the same
    documented ones as the fast version (alpha = 1 -> -inf for all, empty class -> +inf) so the
    two agree everywhere.
    """
    conf = np.asarray(confidence).reshape(-1)[::sample_every]
    pred = np.asarray(prediction).reshape(-1)[::sample_every]
    if alpha >= 1.0:
        return np.full(num_classes, -np.inf, dtype=conf.dtype)
    thresholds = np.full(num_classes, np.inf, dtype=conf.dtype)
    for cls in range(num_classes):
        ranked = np.sort(conf[pred == cls])
        if len(ranked):
            thresholds[cls] = ranked[-min(int(len(ranked) * alpha), len(ranked) - 1) - 1]
    return thresholds


# --------------------------------------------------------------------------------------------
# Labelling at dataset scale: a compact per-image sample, thresholds streamed over it
# --------------------------------------------------------------------------------------------


def valid_pixels(sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) bool, True inside each image's own (h, w) of a padded batch (``batch["size"]``)."""
    rows = torch.arange(height, device=sizes.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(width, device=sizes.device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def sample_confidences(
    probs: torch.Tensor, valid: torch.Tensor | None, sample_every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``sample_every``-th valid pixel's (max p, argmax) of each image, as compact copies.

    probs: (B, C, H, W) softmax probabilities; valid: (B, H, W) bool (False on batch padding, see
    ``valid_pixels``) or None for all valid. Per image, its valid pixels are taken in memory order
    (row-major, which for a padded image is its own h x w flattened) and the 0th, n-th, 2n-th …
    are kept: the authors' successor code (DMT, ``generate_class_balanced_pseudo_labels``) crops
    each image to its size and takes ``flatten()[::16]``, so the sample of an image does not
    depend on the batch it came in. Returns (M,) float32 confidences and (M,) class ids (uint8 up
    to 256 classes, else int32), images one after another. Both are fresh tensors of exactly M
    elements: no view that keeps the batch's full-resolution maps alive.

    Confidences stay float32: thresholds from float16 ones are the float16 roundings of the exact
    ones (rounding is monotone), but in [0.5, 1), where a trained model's maxima sit, float16 has
    only 1024 values (steps of ~0.0005), so a rounded threshold moves by up to that and changes
    which full-precision pixels pass ``p >= t`` — the labels would no longer be the exact rule's.
    """
    if sample_every < 1:
        raise ValueError(f"sample_confidences: sample_every must be >= 1, but got {sample_every}")
    if probs.dim() != 4:
        raise ValueError(f"sample_confidences: probs must be (B, C, H, W), but got shape {tuple(probs.shape)}")
    confidence, prediction = probs.max(dim=1)  # (B, H, W) each
    if valid is None:
        valid = torch.ones_like(confidence, dtype=torch.bool)
    elif valid.shape != confidence.shape:
        raise ValueError(f"sample_confidences: valid must be {tuple(confidence.shape)}, but got {tuple(valid.shape)}")
    flat_valid = valid.reshape(valid.shape[0], -1)
    rank = flat_valid.cumsum(1, dtype=torch.int32) - 1  # (B, H*W): index among the image's valid pixels
    keep = (flat_valid & (rank % sample_every == 0)).view_as(valid)
    class_dtype = torch.uint8 if probs.shape[1] <= 256 else torch.int32
    # Boolean indexing copies, in row-major (image, then pixel) order.
    return confidence[keep].float(), prediction[keep].to(class_dtype)


# Radix digits over the 32-bit unsigned order key: three histogram passes of 2**11 buckets per class.
_SAMPLE_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, width)
_BLOCK = 1 << 17  # elements per streamed block: bounds the temporaries (~6 MiB) whatever M is


def class_balanced_thresholds_from_sample(
    confidence: torch.Tensor | Sequence[torch.Tensor],
    classes: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    alpha: float,
    *,
    keep_small_classes: bool = True,
) -> torch.Tensor:
    """``class_balanced_thresholds(confidence, classes, num_classes, alpha, sample_every=1)`` for an
    already drawn sample, in memory bounded by a fixed block size beyond the sample itself.

    confidence: (M,) floating (float32, float16 or bfloat16), or a sequence of 1-D pieces (e.g. one
    per batch from ``sample_confidences``), which need not be concatenated; classes: integer, the
    same lengths. Returns (num_classes,) in confidence's dtype; keep ``p >= thresholds[c]``.

    Same rule as ``class_balanced_thresholds``: the (int(n·alpha) + 1)-th largest of each class,
    +inf for a class with no sample, -inf everywhere for alpha = 1. With ``keep_small_classes``
    (the default), a class with n·alpha < 1, too few samples to rank, gets -inf and keeps all its
    pixels, as the authors' successor code does (DMT: ``kc = 1e-5`` when ``len * ratio < 1``, which
    every softmax maximum passes); that includes a class with no sample at all. Not for alpha = 0,
    where it would keep everything when nothing was asked for: there each class keeps its top
    sampled value and ties. ``keep_small_classes=False`` gives bit-for-bit the result of
    ``class_balanced_thresholds``.

    How: the radix selection of ``class_balanced_thresholds`` (three histogram passes over the
    float32 bit patterns), but each pass streams over the sample in blocks of ``_BLOCK`` elements
    and only the (class, digit) histograms are kept, so the temporaries do not grow with M; the
    chosen digits spell the threshold's bit pattern, so no candidate is gathered.
    """
    conf_pieces = [confidence] if isinstance(confidence, torch.Tensor) else list(confidence)
    class_pieces = [classes] if isinstance(classes, torch.Tensor) else list(classes)
    dtype, device = _check_sample(conf_pieces, class_pieces, alpha)
    if alpha >= 1.0:
        return torch.full((num_classes,), -math.inf, dtype=dtype, device=device)
    if num_classes * (1 << max(width for _, width in _SAMPLE_DIGITS)) >= 2**31:
        raise ValueError(f"class_balanced_thresholds_from_sample: num_classes={num_classes} is too large")
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    prefix = torch.zeros(num_classes, dtype=torch.int64, device=device)  # chosen high digits per class
    k = None
    for pass_index, (shift, width) in enumerate(_SAMPLE_DIGITS):
        hist = _digit_histogram(conf_pieces, class_pieces, num_classes, shift, width, prefix, first=pass_index == 0)
        if k is None:
            counts = hist.sum(1)
            # int(n * alpha) in float64, exactly as Python's int(len(r) * alpha) in the authors' code.
            k = torch.minimum(torch.floor(counts.to(torch.float64) * alpha).to(torch.int64) + 1, counts)
        bucket, k = _bucket_of_kth_largest(hist, k)
        prefix = (prefix << width) | bucket
    thresholds = _float32_of_order_key(prefix).to(dtype)
    thresholds = torch.where(counts > 0, thresholds, torch.full_like(thresholds, math.inf))
    if keep_small_classes and alpha > 0:
        small = counts.to(torch.float64) * alpha < 1
        thresholds = torch.where(small, torch.full_like(thresholds, -math.inf), thresholds)
    return thresholds


def _check_sample(
    conf_pieces: list[torch.Tensor], class_pieces: list[torch.Tensor], alpha: float
) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of the sample; one ValueError naming what is wrong otherwise."""
    name = "class_balanced_thresholds_from_sample"
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}: alpha must lie in [0, 1], but got alpha={alpha}")
    if len(conf_pieces) != len(class_pieces):
        raise ValueError(f"{name}: {len(conf_pieces)} confidence pieces but {len(class_pieces)} class pieces")
    if not conf_pieces:
        return torch.float32, torch.device("cpu")
    dtype, device = conf_pieces[0].dtype, conf_pieces[0].device
    for conf, cls in zip(conf_pieces, class_pieces):
        if conf.dim() != 1 or conf.shape != cls.shape:
            raise ValueError(f"{name}: confidence {tuple(conf.shape)} and classes {tuple(cls.shape)} must be 1-D of one length")
        if conf.dtype != dtype or dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: confidence must be float32, float16 or bfloat16 throughout, but got {conf.dtype}")
        if cls.is_floating_point() or cls.dtype == torch.bool:
            raise ValueError(f"{name}: classes must be an integer tensor, but got {cls.dtype}")
    return dtype, device


def _blocks(conf_pieces: list[torch.Tensor], class_pieces: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 confidences, int32 classes) of the sample in order, about ``_BLOCK`` at a time;
    small pieces (one batch's sample) are gathered so the per-block overhead stays small."""
    pending_conf: list[torch.Tensor] = []
    pending_cls: list[torch.Tensor] = []
    pending = 0
    for conf, cls in zip(conf_pieces, class_pieces):
        for start in range(0, conf.numel(), _BLOCK):
            pending_conf.append(conf[start : start + _BLOCK])
            pending_cls.append(cls[start : start + _BLOCK])
            pending += pending_conf[-1].numel()
            if pending >= _BLOCK:
                yield _joined(pending_conf).float(), _joined(pending_cls).int()
                pending_conf, pending_cls, pending = [], [], 0
    if pending:
        yield _joined(pending_conf).float(), _joined(pending_cls).int()


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one piece: a view, no copy


def _unsigned_order_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 whose bits, read as unsigned, order like float32 ``values`` (no NaN): the sign bit
    flipped for non-negative floats, every bit for negative ones."""
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) | -(2**31))


def _float32_of_order_key(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_unsigned_order_bits``: (C,) int64 keys in [0, 2**32) -> float32 values."""
    ordered = (keys - 2**31).to(torch.int32)  # the ``_ordered_int32`` image
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)  # the flip is its own inverse


def _digit_histogram(
    conf_pieces: list[torch.Tensor], class_pieces: list[torch.Tensor], num_classes: int,
    shift: int, width: int, prefix: torch.Tensor, *, first: bool,
) -> torch.Tensor:
    """(C, 2**width) counts of the digit at ``shift`` among each class's elements whose higher
    digits equal ``prefix[class]`` (all elements in the first pass, which also checks them)."""
    radix = 1 << width
    size = num_classes * radix
    high_mask = (1 << (32 - shift - width)) - 1  # the digits above this one, without sign extension
    high_prefix = prefix.to(torch.int32)  # < 2**22: fits
    hist = torch.zeros(size + 1, dtype=torch.int64, device=prefix.device)  # last slot: not a candidate
    for conf, cls in _blocks(conf_pieces, class_pieces):
        if first:
            _check_block(conf, cls, num_classes)
        keys = _unsigned_order_bits(conf)
        ids = cls * radix + ((keys >> shift) & (radix - 1))  # int32: C * R < 2**31
        if not first:
            ids = torch.where(((keys >> (shift + width)) & high_mask) == high_prefix[cls], ids, size)
        hist += torch.bincount(ids, minlength=size + 1)
    return hist[:size].view(num_classes, radix)


def _check_block(conf: torch.Tensor, cls: torch.Tensor, num_classes: int) -> None:
    if bool(torch.isnan(conf).any()):
        raise ValueError("class_balanced_thresholds_from_sample: confidence holds NaN")
    low, high = int(cls.min()), int(cls.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"prediction holds class {low if low < 0 else high} but classes are 0..{num_classes - 1}")


def _bucket_of_kth_largest(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the digit bucket holding its k-th largest element, and k's rank inside it.

    hist: (C, R) counts; k: (C,) 1-based rank from the top (0 for an empty class, whose bucket
    means nothing). Returns (bucket (C,), k minus the count of elements in higher buckets (C,)).
    """
    at_least = hist.flip(1).cumsum(1).flip(1)  # (C, R): elements whose digit >= r
    bucket = ((at_least >= k[:, None]).sum(1) - 1).clamp(min=0)  # last r with at_least >= k
    above = torch.cat([at_least[:, 1:], torch.zeros_like(at_least[:, :1])], dim=1)  # digit > r
    higher = above.gather(1, bucket[:, None])[:, 0]
    return bucket, torch.where(k > 0, k - higher, k)
