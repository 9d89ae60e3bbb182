"""A picture of the confusion matrix, for MLflow artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from selftune.metrics.confusion import iou_from_matrix, nan_mean

__all__ = ["confusion_title", "plot_confusion_matrix"]

ANNOTATE_UP_TO = 25  # classes; beyond that the numbers no longer fit in their cells


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each ground-truth row divided by its total (recall per class); rows never seen stay 0."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=np.float64), where=totals > 0)


def confusion_title(matrix: torch.Tensor | np.ndarray, stage: str | None = None) -> str:
    """``<stage>: mIoU 0.7123``, the mIoU read from ``matrix`` as the stages score it (a class absent
    from ground truth and prediction is left out of the mean)."""
    counts = matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else torch.as_tensor(np.asarray(matrix))
    miou = nan_mean(iou_from_matrix(counts))
    score = "mIoU n/a (no pixels)" if miou != miou else f"mIoU {miou:.4f}"
    return f"{stage}: {score}" if stage else score


def plot_confusion_matrix(
    matrix: torch.Tensor | np.ndarray, class_names: Sequence[str], path: str | Path, *,
    stage: str | None = None, title: str | None = None,
) -> Path:
    """Save the row-normalised (C, C) confusion matrix (rows = ground truth) as a PNG at ``path``,
    titled ``title`` (default: ``confusion_title(matrix, stage)``, the stage name and its mIoU).

    Uses matplotlib's Agg canvas directly (no pyplot), so it neither needs a display nor changes
    the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only plotting needs it
    from matplotlib.figure import Figure

    counts = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix of shape {counts.shape} needs a square (C, C) matrix with C = "
            f"len(class_names) = {len(class_names)}"
        )
    fraction = _row_normalised(counts.astype(np.float64))
    size = len(class_names)
    side = min(4 + 0.45 * size, 24)  # inches: readable labels without huge files for many classes
    figure = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of ground-truth row")
    axes.set_xticks(range(size), labels=list(class_names), rotation=90)
    axes.set_yticks(range(size), labels=list(class_names))
    axes.set_title(confusion_title(counts, stage) if title is None else title, fontsize=12)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if size <= ANNOTATE_UP_TO:
        for row in range(size):
            for col in range(size):
                value = fraction[row, col]
                if value >= 0.005:
                    color = "white" if value > 0.5 else "black"
                    axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
