"""ST++ (Yang et al.): select and prioritise the unlabelled images whose pseudo masks are stable.

``stability_scores``: eq. 4, how much the masks of earlier checkpoints agree with the last one;
``select_reliable`` / ``split_reliable``: the top-R images are pseudo-labelled and re-trained on
first, the rest later.
"""

from __future__ import annotations

import torch

from selftune.methods.common import IGNORE_INDEX

__all__ = ["per_image_miou", "select_reliable", "snapshot_epochs", "split_reliable", "stability_scores"]


def per_image_miou(
    prediction: torch.Tensor,
    reference: torch.Tensor,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """mIoU of each image's ``prediction`` against ``reference``: (N, H, W) x 2 -> (N,) float64.

    One confusion matrix per image (a single ``bincount``); IoU = TP / (TP + FP + FN) per class,
    averaged over the classes present in either map (nan-mean: a class absent from both is
    skipped, as ST++'s ``meanIOU``). Pixels where either map is ``ignore_index`` are skipped. An
    image with no pixel left is NaN. ``num_classes`` defaults to the largest class id + 1.
    """
    if prediction.shape != reference.shape or prediction.dim() != 3:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} must both be (N, H, W)"
        )
    images = prediction.shape[0]
    valid = (prediction != ignore_index) & (reference != ignore_index)
    if num_classes is None:
        num_classes = int(torch.maximum(prediction[valid].max(), reference[valid].max())) + 1 if valid.any() else 1
    image_index = torch.arange(images, device=prediction.device)[:, None, None].expand_as(prediction)
    cell = (image_index * num_classes + reference.long()) * num_classes + prediction.long()  # (N, H, W)
    counts = torch.bincount(cell[valid], minlength=images * num_classes * num_classes)
    confusion = counts.view(images, num_classes, num_classes).to(torch.float64)  # [n, reference, prediction]
    true_positive = confusion.diagonal(dim1=1, dim2=2)  # (N, C)
    union = confusion.sum(dim=2) + confusion.sum(dim=1) - true_positive  # (N, C); 0 = absent from both
    iou = true_positive / union  # NaN where absent from both
    return torch.nanmean(iou, dim=1)


def stability_scores(
    masks: torch.Tensor, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Eq. 4: ``s_i = mean_{j<K} mIoU(M_ij, M_iK)``, masks (K, N, H, W) -> scores (N,) float64.

    masks[j] are the argmax predictions of checkpoint j (the authors save K = 3, at E/3, 2E/3, E);
    the last one is the reference. The paper sums over j, the authors' code averages: same ranking,
    and the mean stays in [0, 1] (identical masks score 1). Classes absent from both masks of a
    pair are skipped (``per_image_miou``).
    """
    if masks.dim() != 4 or masks.shape[0] < 2:
        raise ValueError(f"stability_scores: masks must be (K >= 2, N, H, W), got {tuple(masks.shape)}")
    if num_classes is None:
        valid = masks != ignore_index
        num_classes = int(masks[valid].max()) + 1 if valid.any() else 1
    last = masks[-1]
    per_checkpoint = [per_image_miou(masks[j], last, num_classes, ignore_index) for j in range(masks.shape[0] - 1)]
    return torch.stack(per_checkpoint).mean(dim=0)


def snapshot_epochs(epochs: int, snapshots: int) -> list[int]:
    """The epochs after which the supervised teacher's K checkpoints are saved: ``j * E // K`` for
    j = 1..K, so K = 3 gives the authors' E // 3, 2E // 3 and E (the last one is the reference M_K).
    Needs at least one epoch per checkpoint (``epochs >= snapshots``), else two would coincide."""
    if snapshots < 2:
        raise ValueError(f"stability needs at least 2 checkpoints, but got snapshots={snapshots}")
    if epochs < snapshots:
        raise ValueError(f"epochs >= snapshots must hold (one checkpoint per distinct epoch), but got epochs={epochs}, snapshots={snapshots}")
    return [j * epochs // snapshots for j in range(1, snapshots + 1)]


def select_reliable(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``int(N * fraction)`` most stable images, most stable first: (R,) long.

    Ties keep the original order (a stable sort, like the authors' Python ``sorted``), and NaN
    scores (images with nothing to compare) rank last. fraction = 0.5 is the authors' top half
    (``len // 2``).
    """
    return split_reliable(scores, fraction)[0]


def split_reliable(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reliable, unreliable) indices: ``select_reliable`` and the rest, both most stable first."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the reliable fraction must lie in [0, 1], but got fraction={fraction}")
    ranked = torch.where(torch.isnan(scores), torch.full_like(scores, -torch.inf), scores)
    order = torch.sort(ranked, descending=True, stable=True).indices
    cut = int(scores.shape[0] * fraction)
    return order[:cut], order[cut:]
