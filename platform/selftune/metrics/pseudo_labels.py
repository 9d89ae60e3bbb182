"""How good are the pseudo labels? They are compared with the unlabelled images' real ground truth,
which benchmark datasets have but the method never sees.

The three numbers of the auxiliary-confidence-network paper (tables 3-5), used for every method:
mIoU over kept pixels, class coverage ("class semi ratio") and the kept fraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from selftune.metrics.confusion import ConfusionMatrix, all_reduce_sum_, check_class_range

__all__ = ["PseudoLabelQuality", "value_pair_counts"]


def value_pair_counts(pseudo: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """(256, 256) int64: ``counts[g, p]`` = pixels whose ground truth is ``g`` and pseudo label ``p``,
    for two uint8 arrays of the same shape, in one bincount pass (a labeller's batch on the CPU)."""
    if pseudo.shape != ground_truth.shape or pseudo.dtype != np.uint8 or ground_truth.dtype != np.uint8:
        raise ValueError(f"value_pair_counts takes two uint8 arrays of one shape, got {pseudo.dtype} "
                         f"{pseudo.shape} and {ground_truth.dtype} {ground_truth.shape}")
    pairs = (ground_truth.astype(np.uint16) << 8) | pseudo
    return np.bincount(pairs.ravel(), minlength=256 * 256).reshape(256, 256)


class PseudoLabelQuality:
    """Accumulates pseudo labels against ground truth; ``ignore_index`` in a pseudo label = not kept.

    Only pixels with valid ground truth (``!= ignore_index``) count. ``compute()`` returns

    * ``miou``: mIoU of the kept pixels against their ground truth (nan-mean: classes absent from
      both the kept ground truth and the kept pseudo labels are left out);
    * ``kept_fraction``: kept valid pixels / all valid pixels;
    * ``class_coverage``: mean over the classes that have ground-truth pixels of the fraction of
      that class's pixels that are kept (the paper's "class semi ratio"; a class whose pixels are
      all dropped counts as 0, which is what this number is meant to reveal);
    * ``per_class_coverage``: list of C floats, that fraction per class (the terms of
      ``class_coverage``), NaN for a class with no ground-truth pixels;
    * ``pixel_accuracy``: correct kept pixels / kept pixels;
    * ``per_class_iou``: list of C floats, NaN where undefined;
    * ``num_pixels``: valid ground-truth pixels seen; ``num_kept_pixels``: those that were kept.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.kept = ConfusionMatrix(num_classes, ignore_index)  # kept pixels: rows gt, cols pseudo
        self.ground_truth_counts = torch.zeros(num_classes, dtype=torch.int64)  # every valid gt pixel

    def update(self, pseudo: torch.Tensor, ground_truth: torch.Tensor) -> None:
        """``pseudo`` and ``ground_truth`` of the same shape, e.g. (B, H, W) class ids."""
        if pseudo.shape != ground_truth.shape:
            raise ValueError(
                f"pseudo label and ground truth shapes differ: {tuple(pseudo.shape)} vs {tuple(ground_truth.shape)}"
            )
        pseudo, ground_truth = pseudo.long(), ground_truth.long()
        valid = ground_truth != self.ignore_index
        truth = ground_truth[valid]
        check_class_range(truth, self.num_classes, "ground truth")
        if self.ground_truth_counts.device != truth.device:
            self.ground_truth_counts = self.ground_truth_counts.to(truth.device)
        self.ground_truth_counts += torch.bincount(truth, minlength=self.num_classes)
        # Dropped pixels become "ignore" in the target, so the matrix counts kept pixels only.
        kept_truth = ground_truth.masked_fill(pseudo == self.ignore_index, self.ignore_index)
        self.kept.update(pseudo, kept_truth)

    def add_pair_counts(self, counts: np.ndarray) -> None:
        """Add a ``value_pair_counts`` table: the same totals as ``update`` on those pixels, with
        the same errors for values that are neither a class nor ``ignore_index`` (which must be 255)."""
        n, ignore = self.num_classes, self.ignore_index
        if ignore != 255:
            raise ValueError(f"value pair counts are of uint8 labels with 255 = ignore; this quality ignores {ignore}")
        ground_truth_rows = counts[:n]  # rows of valid ground truth
        self._reject("ground truth", counts.sum(axis=1), n)
        self._reject("prediction", ground_truth_rows.sum(axis=0), n)
        totals = torch.from_numpy(ground_truth_rows.sum(axis=1))
        kept = torch.from_numpy(np.ascontiguousarray(ground_truth_rows[:, :n]))
        self.ground_truth_counts += totals.to(self.ground_truth_counts.device)
        self.kept.matrix += kept.to(self.kept.matrix.device)

    def _reject(self, what: str, value_counts: np.ndarray, n: int) -> None:
        bad = np.flatnonzero(value_counts[n:255]) + n
        if bad.size:
            raise ValueError(f"{what} holds class {int(bad[0])} but classes are 0..{n - 1} "
                             "(or the ignore index, in the target only)")

    def all_reduce(self) -> None:
        """Sum the counts of all workers; a no-op without a process group. Call once, at the end."""
        self.kept.all_reduce()
        all_reduce_sum_(self.ground_truth_counts)

    def compute(self) -> dict[str, Any]:
        counts = self.ground_truth_counts.cpu().double()  # (C,) valid gt pixels per class
        kept_per_class = self.kept.matrix.sum(dim=1).cpu().double()  # (C,) kept pixels per gt class
        total, kept = counts.sum().item(), kept_per_class.sum().item()
        present = counts > 0
        coverage = (kept_per_class[present] / counts[present]).mean().item() if present.any() else float("nan")
        per_class_coverage = torch.where(present, kept_per_class / counts.clamp(min=1), float("nan"))
        return {
            "miou": self.kept.miou(),
            "kept_fraction": kept / total if total else float("nan"),
            "class_coverage": coverage,
            "per_class_coverage": per_class_coverage.tolist(),
            "pixel_accuracy": self.kept.pixel_accuracy(),
            "per_class_iou": self.kept.iou().tolist(),
            "num_pixels": int(total),
            "num_kept_pixels": int(kept),
        }

    def reset(self) -> None:
        self.kept.reset()
        self.ground_truth_counts.zero_()
