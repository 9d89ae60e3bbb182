"""The confusion matrix accumulated over a whole evaluation set, and the scores read from it."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "all_reduce_sum_", "check_class_range", "iou_from_matrix", "nan_mean"]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across the workers of the default process group; no-op without one.

    NCCL only reduces CUDA tensors, so a CPU tensor (a worker that saw no batch never moved its
    counts to the GPU) travels through the current CUDA device and back.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_class_range(values: torch.Tensor, num_classes: int, what: str) -> None:
    """ValueError if any of ``values`` (ignored pixels already removed) is not a class id."""
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        raise ValueError(
            f"{what} holds class {values[bad][0].item()} but classes are 0..{num_classes - 1} "
            "(or the ignore index, in the target only)"
        )


def iou_from_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN) from a (C, C) matrix, rows = ground truth; float64 (C,).

    NaN for a class absent from both ground truth and prediction (0 / 0): its IoU is undefined.
    """
    matrix = matrix.double()
    true_positive = matrix.diagonal()
    union = matrix.sum(dim=1) + matrix.sum(dim=0) - true_positive
    return true_positive / union  # 0 / 0 -> NaN by IEEE rules, which is what we want


def nan_mean(values: torch.Tensor) -> float:
    """Mean over the finite entries; NaN when there are none (not a warning, not 0)."""
    kept = values[~values.isnan()]
    return kept.mean().item() if kept.numel() else float("nan")


class ConfusionMatrix:
    """Counts ``matrix[gt, pred]`` over every non-ignored pixel seen by ``update``.

    ``matrix`` is an int64 (C, C) tensor, rows = ground truth, columns = prediction; it lives on
    the device of the tensors passed to ``update`` (counted there with ``torch.bincount``).

    mIoU convention (selftune's): a class absent from both ground truth and prediction has IoU NaN
    and is left out of the mean. This differs from repositories that count such a class as 0 or
    (DST-CBC) take a plain mean that turns NaN; the numbers differ only when a class never appears.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must lie outside 0..{num_classes - 1}, got {ignore_index}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``prediction`` and ``target`` of the same shape, e.g. (B, H, W) class ids.

        Pixels whose target is ``ignore_index`` are skipped. Any other value outside
        ``0..num_classes-1``, in either tensor, raises ValueError (a silent miscount otherwise).
        """
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction and target shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}"
            )
        prediction, target = prediction.reshape(-1).long(), target.reshape(-1).long()
        valid = target != self.ignore_index
        prediction, target = prediction[valid], target[valid]
        check_class_range(prediction, self.num_classes, "prediction")
        check_class_range(target, self.num_classes, "target")
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        n = self.num_classes
        counts = torch.bincount(target * n + prediction, minlength=n * n)  # flat index gt * C + pred
        self.matrix += counts.reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the counts of all workers (``torch.distributed``); a no-op without a process group.

        Call it once, after the last ``update``: calling it twice counts everything twice.
        """
        all_reduce_sum_(self.matrix)

    def iou(self) -> torch.Tensor:
        """Per-class IoU, float64 (C,), NaN for a class absent from both ground truth and prediction."""
        return iou_from_matrix(self.matrix).cpu()

    def miou(self) -> float:
        """Mean IoU over the classes present in ground truth or prediction.

        Classes absent from both are left out (nan-mean; selftune's convention, see the class doc).
        """
        return nan_mean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; NaN before any pixel is counted."""
        total = self.matrix.sum().item()
        return self.matrix.diagonal().sum().item() / total if total else float("nan")

    def reset(self) -> None:
        self.matrix.zero_()
