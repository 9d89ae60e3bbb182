"""Evaluation metrics: the confusion matrix behind every mIoU, and pseudo-label quality.

Convention (selftune's, stated once here and in each docstring): a class absent from *both* the
ground truth and the prediction has an undefined IoU (NaN) and is left out of the mean ("nan-mean").
Some peer repositories count such classes as 0 or average NaN into NaN; their numbers differ from
ours only when an evaluation set misses a class entirely.
"""

from __future__ import annotations

from selftune.metrics.confusion import ConfusionMatrix
from selftune.metrics.plot import plot_confusion_matrix
from selftune.metrics.pseudo_labels import PseudoLabelQuality

__all__ = ["ConfusionMatrix", "PseudoLabelQuality", "plot_confusion_matrix"]
