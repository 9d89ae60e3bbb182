"""ConfusionMatrix on hand-computed cases, and its all_reduce with and without a process group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selftune.metrics import ConfusionMatrix, PseudoLabelQuality, plot_confusion_matrix
from selftune.metrics.plot import confusion_title

# A 2x3 image, 3 classes, the last pixel ignored (its prediction does not count).
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PREDICTION = torch.tensor([[0, 1, 1], [2, 2, 0]])
# (gt, pred) pairs: (0,0) (0,1) (1,1) (1,2) (2,2)  ->  rows = ground truth, columns = prediction
MATRIX = [
    [1, 1, 0],
    [0, 1, 1],
    [0, 0, 1],
]
# IoU_c = TP / (row + column - TP):  class 0: 1 / (2 + 1 - 1) = 1/2,  class 1: 1 / (2 + 2 - 1) = 1/3,
# class 2: 1 / (1 + 2 - 1) = 1/2;  mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9;  pixel accuracy = 3 / 5.
IOU = [1 / 2, 1 / 3, 1 / 2]


def filled(num_classes: int = 3) -> ConfusionMatrix:
    confusion = ConfusionMatrix(num_classes)
    confusion.update(PREDICTION, TARGET)
    return confusion


def test_hand_computed_matrix_iou_miou_and_accuracy():
    confusion = filled()
    assert confusion.matrix.dtype == torch.int64
    assert confusion.matrix.tolist() == MATRIX
    assert confusion.iou().tolist() == pytest.approx(IOU)
    assert confusion.miou() == pytest.approx(4 / 9)
    assert confusion.pixel_accuracy() == pytest.approx(3 / 5)


def test_class_absent_from_both_is_left_out_of_the_mean():
    confusion = filled(num_classes=4)  # class 3 never occurs, in ground truth or prediction
    iou = confusion.iou()
    assert math.isnan(iou[3]) and iou[:3].tolist() == pytest.approx(IOU)
    assert confusion.miou() == pytest.approx(4 / 9)  # not (4/3) / 4 = 1/3, as counting it as 0 would give


def test_class_missing_from_one_side_counts_as_zero():
    confusion = ConfusionMatrix(3)
    # class 2 is predicted once but never in the ground truth: IoU 0 / 1 = 0, and it is averaged in.
    confusion.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    # class 0: 1/1, class 1: 1 / (2 + 1 - 1) = 1/2, class 2: 0 / (0 + 1 - 0) = 0  ->  mIoU 1/2
    assert confusion.iou().tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert confusion.miou() == pytest.approx(0.5)


def test_updates_accumulate_and_ignore_any_prediction_on_ignored_pixels():
    confusion = ConfusionMatrix(3)
    confusion.update(PREDICTION[:1], TARGET[:1])
    confusion.update(torch.tensor([[2, 2, 255]]), TARGET[1:])  # 255 predicted where the target is ignored
    assert confusion.matrix.tolist() == MATRIX


def test_batched_uint8_masks_are_accepted():
    confusion = ConfusionMatrix(3)
    confusion.update(PREDICTION.expand(4, 2, 3), TARGET.to(torch.uint8).expand(4, 2, 3))  # (B, H, W)
    assert confusion.matrix.tolist() == [[4 * v for v in row] for row in MATRIX]


def test_out_of_range_values_and_shape_mismatch_raise():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target holds class 7 but classes are 0\.\.2"):
        confusion.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"prediction holds class 3 but classes are 0\.\.2"):
        confusion.update(torch.tensor([3, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shapes differ: \(2,\) vs \(3,\)"):
        confusion.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert confusion.matrix.sum() == 0  # a rejected batch adds nothing


def test_empty_matrix_gives_nan_and_reset_clears():
    confusion = filled()
    confusion.reset()
    assert confusion.matrix.sum() == 0
    assert math.isnan(confusion.miou()) and math.isnan(confusion.pixel_accuracy())


def test_all_reduce_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    confusion = filled()
    confusion.all_reduce()
    assert confusion.matrix.tolist() == MATRIX


def _all_reduce_worker(rank: int, world_size: int, folder: str) -> None:
    """Each rank sees one row of the example image and saves what it holds after all_reduce."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        confusion = ConfusionMatrix(3)
        confusion.update(PREDICTION[rank], TARGET[rank])
        quality = PseudoLabelQuality(3)
        quality.update(PREDICTION[rank], TARGET[rank])
        confusion.all_reduce()
        quality.all_reduce()
        torch.save({"confusion": confusion.matrix, "kept": quality.kept.matrix, "truth": quality.ground_truth_counts},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_two_gloo_workers(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # both hold the whole image
        held = torch.load(tmp_path / f"rank{rank}.pt")
        assert held["confusion"].tolist() == MATRIX, rank
        # Every prediction counts as kept here, so the pseudo-label matrix is the same one.
        assert held["kept"].tolist() == MATRIX, rank
        assert held["truth"].tolist() == [2, 2, 1], rank


def test_plot_writes_a_png(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # a row with no pixels must not divide by 0
    path = plot_confusion_matrix(matrix, ["road", "sky", "car"], tmp_path / "plots" / "confusion.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_rejects_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 3\) needs a square \(C, C\) matrix with C = len\(class_names\) = 2"):
        plot_confusion_matrix(torch.zeros(3, 3), ["a", "b"], tmp_path / "x.png")


def test_title_names_the_stage_and_its_miou():
    # IoU = TP / (row + column - TP): 5/8, 0/1 (predicted, never true), 7/9; mean 0.4676.
    matrix = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    assert confusion_title(matrix, "supervised") == "supervised: mIoU 0.4676"
    assert confusion_title(matrix.numpy()) == "mIoU 0.4676"
    # A class absent from ground truth and prediction is left out, as the stages score it.
    assert confusion_title(torch.tensor([[3, 1, 0], [1, 3, 0], [0, 0, 0]]), "self_train") == "self_train: mIoU 0.6000"
    assert confusion_title(torch.zeros(2, 2, dtype=torch.int64)) == "mIoU n/a (no pixels)"


def test_plot_draws_the_title_above_the_matrix(tmp_path):
    from PIL import Image

    matrix = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    names = ["road", "sky", "car"]
    pictures = [np.asarray(Image.open(plot_confusion_matrix(matrix, names, tmp_path / f"{k}.png", **kwargs)).convert("L"))
                for k, kwargs in enumerate([{"stage": "supervised"}, {"title": "another title, longer than that"}])]
    assert pictures[0].shape == pictures[1].shape
    differs = np.flatnonzero((pictures[0] != pictures[1]).any(axis=1))
    assert differs.size and differs.max() < 0.1 * pictures[0].shape[0]  # only the top band: the title
