"""Multi-scale + flip test-time-augmented labelling (shared by ST++ and Yuan et al.)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from selftune.engine.context import WorkerContext
from selftune.stages.tta import TtaLabelStage, tta_labels, tta_probabilities, view_count

CTX = WorkerContext.local("cpu")


class Ramp(nn.Module):
    """Ignores the image: class 1's logit is the column index, class 0's is 0 (not flip-symmetric)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(b, h, w)
        return torch.stack([torch.zeros_like(ramp), ramp], dim=1)  # (B, 2, H, W)


class Pointwise(nn.Module):
    """A 1x1 "network": logits = (channel 0, -channel 0), so it commutes with resizing a constant image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_flipped_view_is_flipped_back_before_summing():
    probs = tta_probabilities(Ramp(), torch.zeros(1, 3, 2, 4), CTX, scales=[1.0], flip=True)
    # Pixel column j: softmax of the plain view gives sigmoid(j) for class 1; the flipped view's
    # column W-1-j lands on j after flipping back, giving sigmoid(3 - j).
    for j in range(4):
        assert probs[0, 1, 0, j].item() == pytest.approx(sigmoid(j) + sigmoid(3 - j), abs=1e-6)
        assert probs[0, :, 0, j].sum().item() == pytest.approx(2.0, abs=1e-6)


def test_without_flip_a_single_scale_is_the_plain_softmax():
    probs = tta_probabilities(Ramp(), torch.zeros(2, 3, 3, 4), CTX, scales=[1.0], flip=False)
    assert probs[1, 1, 2, 2].item() == pytest.approx(sigmoid(2), abs=1e-6)


def test_every_scale_is_resized_back_and_summed():
    images = torch.full((1, 3, 8, 8), 0.7)  # constant: every scale sees the same logits
    probs = tta_probabilities(Pointwise(), images, CTX, scales=[0.5, 1.0, 1.5], flip=True)
    assert probs.shape == (1, 2, 8, 8)
    expected = 6 * sigmoid(1.4)  # 3 scales x 2 flips of softmax([0.7, -0.7])[0]
    assert torch.allclose(probs[0, 0], torch.full((8, 8), expected), atol=1e-5)


def test_labels_take_the_argmax_and_threshold_the_mean_probability():
    summed = torch.tensor([[[[1.2]], [[0.8]]], [[[1.8]], [[0.2]]]])  # 2 views: means 0.6/0.4 and 0.9/0.1
    assert view_count([1.0], True) == 2
    assert tta_labels(summed.clone(), 2, None).flatten().tolist() == [0, 0]
    assert tta_labels(summed.clone(), 2, 0.7).flatten().tolist() == [255, 0]


def test_scales_must_be_positive():
    assert TtaLabelStage(name="l").scales == [0.5, 0.75, 1.0, 1.5, 1.75]  # the paper's default
    with pytest.raises(ValidationError, match="every scale must be > 0"):
        TtaLabelStage(name="l", scales=[1.0, 0.0])
