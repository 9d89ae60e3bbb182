"""Semi-supervised segmentation with an auxiliary confidence network (seed 004, Sec. 3.1).

Stage 2 trains a small CNN on the segmentation network's class-probability map to predict, per
pixel, "the segmentation is correct here" with the weighted binary cross-entropy of eq. 1; stage 3
keeps the pixels whose predicted confidence reaches ``T_aux`` as pseudo labels.

* ``class_probability`` / ``class_weights``: ENet-style ``W = 1 / ln(c + p_class)``.
* ``correctness_target``: the auxiliary ground truth ``y`` (prediction == label).
* ``auxiliary_confidence_loss``: eq. 1.
* ``confident_pseudo_labels``: stage 3's selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selftune.methods.common import IGNORE_INDEX

__all__ = [
    "auxiliary_confidence_loss",
    "class_probability",
    "class_weights",
    "confident_pseudo_labels",
    "correctness_target",
    "positive_weights",
]


def class_probability(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``p_class``: each class's share of the labelled pixels, (C,) float64.

    labels: any shape, long; ``ignore_index`` pixels are not counted. Accumulate over the
    labelled training set (ENet computes it over the whole training set). All ignored -> zeros.
    """
    kept = labels[labels != ignore_index].reshape(-1)
    counts = torch.bincount(kept, minlength=num_classes)[:num_classes].to(torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def class_weights(class_probability: torch.Tensor, c: float = 1.04) -> torch.Tensor:
    """ENet's class weights ``W = 1 / ln(c + p_class)`` (the paper's W^n_hw), same shape as input.

    c > 1 keeps the logarithm positive; c = 1.04 (the paper) bounds the weights to
    ``[1 / ln(2.04), 1 / ln(1.04)] = [1.40, 25.5]``, rare classes weighing most.
    """
    if c <= 1.0:
        raise ValueError(f"class_weights: c must be > 1 so that ln(c + p) > 0, but got c={c}")
    return 1.0 / torch.log(c + class_probability)


def correctness_target(prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The auxiliary ground truth y of eq. 1: True where ``prediction == labels`` (B, H, W) bool.

    Pixels whose label is ignored come out False; the loss drops them through its
    ``target_class`` argument.
    """
    return prediction == labels


def positive_weights(
    correct: torch.Tensor, target_class: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """gamma of eq. 1 per class: ``#negative / #positive`` among the pixels of that class, (C,).

    correct: bool (B, H, W), the auxiliary ground truth; target_class: (B, H, W) ground-truth
    class (``ignore_index`` pixels skipped). A class with no positive pixel gets 0 (its positive
    term is empty anyway); a class whose pixels are all positive also gets 0, as the formula says.
    """
    valid = target_class != ignore_index
    classes = target_class[valid]
    positives = torch.bincount(classes[correct[valid]], minlength=num_classes)[:num_classes]
    totals = torch.bincount(classes, minlength=num_classes)[:num_classes]
    negatives = totals - positives
    gamma = negatives.to(torch.float64) / positives.clamp(min=1).to(torch.float64)
    return torch.where(positives > 0, gamma, torch.zeros_like(gamma))


def auxiliary_confidence_loss(
    confidence_logits: torch.Tensor,
    correct: torch.Tensor,
    target_class: torch.Tensor,
    class_frequency: torch.Tensor,
    c: float = 1.04,
    *,
    gamma: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eq. 1: ``-sum W (gamma y log a + (1 - y) log(1 - a))`` over the labelled pixels.

    confidence_logits: (B, 1, H, W) or (B, H, W) pre-sigmoid output of the auxiliary network
    (a = sigmoid; log a and log(1 - a) are computed stably as logsigmoid(+-z));
    correct: bool (B, H, W), y = 1 where the segmentation is right (``correctness_target``);
    target_class: (B, H, W) long, the *ground-truth* class at each pixel, ``ignore_index`` where
    there is none; class_frequency: (C,) ``p_class`` of ``class_weights``.

    Where each weight goes (Sec. 3.1): the class weight W multiplies both terms; gamma = #neg /
    #pos of the pixel's class multiplies only the positive term. Both are indexed by the
    ground-truth class, as the paper says ("decided by the ground truth label map"), not by the
    predicted class. gamma is computed from this batch's ``correct`` unless given (C,), e.g.
    counted over the whole labelled set (the paper does not say which; per batch is the default).

    reduction: "mean" (default) divides by the number of labelled pixels, so the scale does not
    depend on the crop size; "sum" is the paper's literal sum. No labelled pixel -> 0, graph kept.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"auxiliary_confidence_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = confidence_logits[:, 0] if confidence_logits.dim() == 4 else confidence_logits  # (B, H, W)
    if logits.shape != correct.shape or correct.shape != target_class.shape:
        raise ValueError(
            f"confidence {tuple(logits.shape)}, correct {tuple(correct.shape)} and target_class "
            f"{tuple(target_class.shape)} must have the same (B, H, W) shape"
        )
    num_classes = class_frequency.shape[0]
    valid = target_class != ignore_index
    if gamma is None:
        gamma = positive_weights(correct, target_class, num_classes, ignore_index)
    classes = torch.where(valid, target_class, torch.zeros_like(target_class))
    weight = class_weights(class_frequency, c).to(logits.device, logits.dtype)[classes]  # (B, H, W)
    pixel_gamma = gamma.to(logits.device, logits.dtype)[classes]  # (B, H, W)
    y = correct.to(logits.dtype)
    log_likelihood = pixel_gamma * y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits)
    total = -(weight * log_likelihood * valid).sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total  # all ignored -> 0


def confident_pseudo_labels(
    prediction: torch.Tensor, confidence: torch.Tensor, t_aux: float, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Stage 3: the segmentation's labels where the auxiliary confidence ``>= T_aux``, else ignored.

    prediction: (B, H, W) long argmax of the segmentation network; confidence: (B, H, W) or
    (B, 1, H, W) sigmoid output in [0, 1]. T_aux = 0 keeps every pixel; the paper's best is 0.9.
    """
    if confidence.dim() == prediction.dim() + 1:
        confidence = confidence[:, 0]
    return torch.where(confidence >= t_aux, prediction, torch.full_like(prediction, ignore_index))
