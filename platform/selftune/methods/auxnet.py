"""Semi-supervised segmentation with an auxiliary confidence network (seed 004, Sec. 3.1).

Stage 2 trains a small CNN on the segmentation network's class-probability map to predict, per
pixel, "the segmentation is correct here" with the weighted binary cross-entropy of eq. 1; stage 3
keeps the pixels whose predicted confidence reaches ``T_aux`` as pseudo labels.

* ``class_probability`` / ``class_weights``: ENet-style ``W = 1 / ln(c + p_class)``.
* ``enet_class_weights``: the same weights straight from labelled masks (or their pixel counts),
  with §4.2's c = 1.1 for the segmentation network's class-weighted cross-entropy
  (``common.class_weighted_cross_entropy``).
* ``correctness_target``: the auxiliary ground truth ``y`` (prediction == label).
* ``auxiliary_confidence_loss``: eq. 1.
* ``confident_pseudo_labels``: stage 3's selection.
* ``AuxiliaryConfidenceNet``: the auxiliary CNN of Table 1 (Sec. 3.2.2).
* ``histogram_auc``: ROC AUC of "prediction is correct" from score histograms (all-reducible).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selftune.methods.common import IGNORE_INDEX

__all__ = [
    "AuxiliaryConfidenceNet",
    "auxiliary_confidence_loss",
    "class_probability",
    "class_weights",
    "confident_pseudo_labels",
    "enet_class_weights",
    "correctness_target",
    "histogram_auc",
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


SEGMENTATION_C = 1.1  # seed 004 §4.2: the segmentation network's ENet weights (eq. 1's aux loss uses 1.04)


def enet_class_weights(
    masks_or_counts: torch.Tensor | Iterable[torch.Tensor],
    num_classes: int,
    c: float = SEGMENTATION_C,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """ENet class weights ``1 / ln(c + p_class)`` from labelled masks: (C,) float64.

    ``masks_or_counts``: a 1-d tensor of ``num_classes`` pixel counts, or labelled masks — one
    tensor of any other shape, or an iterable of them (e.g. each labelled image's mask) —
    whose ``ignore_index`` pixels are not counted. ``p_class`` = count_c / all counted pixels;
    a class never seen gets the largest weight ``1 / ln(c)``. Compute once over the labelled set.
    """
    counts = _class_pixel_counts(masks_or_counts, num_classes, ignore_index)
    total = counts.sum()
    if total <= 0:
        raise ValueError("enet_class_weights: no labelled pixel to count (every mask pixel is ignored)")
    return class_weights(counts / total, c)


def _class_pixel_counts(
    masks_or_counts: torch.Tensor | Iterable[torch.Tensor], num_classes: int, ignore_index: int
) -> torch.Tensor:
    if isinstance(masks_or_counts, torch.Tensor) and masks_or_counts.dim() == 1:
        if masks_or_counts.numel() != num_classes or bool((masks_or_counts < 0).any()):
            raise ValueError(
                f"enet_class_weights: a 1-d input is read as {num_classes} non-negative pixel counts, "
                f"got {masks_or_counts.tolist()}"
            )
        return masks_or_counts.to(torch.float64)
    masks = [masks_or_counts] if isinstance(masks_or_counts, torch.Tensor) else masks_or_counts
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for mask in masks:
        kept = torch.as_tensor(mask).reshape(-1).long()
        kept = kept[kept != ignore_index]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= num_classes):
            raise ValueError(f"enet_class_weights: mask values must lie in 0..{num_classes - 1} or be {ignore_index}")
        counts += torch.bincount(kept, minlength=num_classes).to(torch.float64).cpu()
    return counts


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


def histogram_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """ROC AUC from score histograms over the same ascending bins, (K,) counts each.

    AUC = P(score_pos > score_neg) + P(equal bin) / 2, the Mann-Whitney statistic with scores in
    one bin counted as ties. Histograms (not scores) so that workers can sum them before the AUC.
    Either class empty -> NaN.
    """
    positive, negative = positive.double().cpu(), negative.double().cpu()
    n_pos, n_neg = positive.sum().item(), negative.sum().item()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = torch.cumsum(negative, 0) - negative  # negatives in lower bins, (K,)
    return ((positive * (below + 0.5 * negative)).sum() / (n_pos * n_neg)).item()


def _conv_bn_relu(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class AuxiliaryConfidenceNet(nn.Module):
    """The auxiliary network of Table 1: class probabilities (B, C, H, W) -> confidence logits (B, 1, H, W).

    3x3 conv-BN-ReLU layers with ``channels`` outputs, the first and third of stride 2 (paper: 32,
    64, 128, 256, 256), so features sit at 1/4 resolution; an ASPP of parallel 3x3 dilated
    conv-BN-ReLU branches (paper: rates 1, 2, 4, 8, 16, 32 channels each, no image pooling),
    concatenated; an 8x8 transposed conv of stride 4 back to full size. Returns pre-sigmoid
    logits (the sigmoid of the paper is applied by the loss / the caller). Input sizes that are
    not multiples of 4 are zero-padded and the output cropped back.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256, 256),
        aspp_channels: int = 32,
        aspp_dilations: Sequence[int] = (1, 2, 4, 8, 16),
    ):
        super().__init__()
        if len(channels) < 3:
            raise ValueError(f"AuxiliaryConfidenceNet: channels needs >= 3 layers (two of stride 2), got {list(channels)}")
        if not aspp_dilations:
            raise ValueError("AuxiliaryConfidenceNet: aspp_dilations must name at least one rate")
        layers, cin = [], in_channels
        for index, cout in enumerate(channels):
            layers.append(_conv_bn_relu(cin, cout, stride=2 if index in (0, 2) else 1))
            cin = cout
        self.encoder = nn.Sequential(*layers)
        self.aspp = nn.ModuleList(_conv_bn_relu(cin, aspp_channels, dilation=d) for d in aspp_dilations)
        self.upsample = nn.ConvTranspose2d(aspp_channels * len(aspp_dilations), 1, kernel_size=8, stride=4, padding=2)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H, W)
        height, width = probs.shape[-2:]
        x = F.pad(probs, (0, -width % 4, 0, -height % 4))  # (B, C, 4h, 4w)
        x = self.encoder(x)  # (B, channels[-1], h, w)
        x = torch.cat([branch(x) for branch in self.aspp], dim=1)  # (B, aspp * rates, h, w)
        return self.upsample(x)[..., :height, :width]  # 8x8 kernel, stride 4, pad 2: exactly 4x
