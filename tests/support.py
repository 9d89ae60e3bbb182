"""Helpers shared by test modules (imported as ``from support import ...``; a module named
``conftest`` is ambiguous once several folders have one)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quickstart_overrides(epochs: int = 2, steps: int = 10) -> list[str]:
    """The quickstart pipeline shrunk to seconds: same stages, fewer steps."""
    sets = ["stages.pseudo_label.threshold=0.5"]  # a barely trained model is rarely 90 % sure
    for stage in ("supervised", "self_train"):
        sets += [f"stages.{stage}.epochs={epochs}", f"stages.{stage}.steps_per_epoch={steps}"]
    return [arg for item in sets for arg in ("--set", item)]


def two_stream(batch: dict) -> "TwoStreamBatch":
    """A concatenated ``{"image", "mask", "n_labelled", ...}`` test batch as the stages' two-stream
    batch: the first ``n_labelled`` rows labelled, the rest unlabelled (other keys split alike)."""
    from selftune.data import TwoStreamBatch

    n = int(batch["n_labelled"])
    labelled = {key: value[:n] for key, value in batch.items() if key != "n_labelled"}
    unlabelled = {key: value[n:] for key, value in batch.items() if key != "n_labelled"}
    return TwoStreamBatch(labelled, unlabelled)
