"""The one batch type of two-stream training: a labelled and an unlabelled batch drawn side by side.

Every semi-supervised stage draws one labelled batch (``image``, ``mask`` = ground truth, ``valid``)
and one unlabelled batch per step (``image``, ``mask`` = stored pseudo labels or, for online
methods, ground truth read only to measure pseudo-label quality, ``valid``, and ``image_strong``
where the loader builds a strong view). Losses read ``batch.labelled[...]`` and
``batch.unlabelled[...]``; ``joint(key)`` concatenates the two (labelled first) for methods that run
one forward over both, as DST-CBC's and Yuan et al.'s code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch


@dataclass(frozen=True)
class TwoStreamBatch:
    labelled: dict[str, Any]
    unlabelled: dict[str, Any]

    @property
    def n_labelled(self) -> int:
        return int(self.labelled["image"].shape[0])

    def joint(self, key: str = "image", unlabelled_key: str | None = None) -> torch.Tensor:
        """``cat([labelled[key], unlabelled[unlabelled_key or key]])`` along the batch."""
        return torch.cat([self.labelled[key], self.unlabelled[unlabelled_key or key]])

    def to(self, device: torch.device) -> TwoStreamBatch:
        return TwoStreamBatch(_to(self.labelled, device), _to(self.unlabelled, device))


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def two_streams(labelled: Iterator[Mapping[str, Any]], unlabelled: Iterator[Mapping[str, Any]]) -> Iterator[TwoStreamBatch]:
    """One labelled and one unlabelled batch per step, for as long as both streams last."""
    for a, b in zip(labelled, unlabelled):
        yield TwoStreamBatch(dict(a), dict(b))
