"""A stage's work order: its typed config plus the explicit artifacts it reads and writes.

A stage is a function ``(job, ctx) -> summary``. Inputs arrive as absolute paths chosen by the
driver from the stage's declared ``upstream()`` references; nothing is found by "newest file in a
folder". Outputs go to ``job.output_dir`` (on storage every worker and the driver can read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from selftune.config import PipelineConfig, StageConfig

CHECKPOINT = "checkpoint"  # a training stage's best model: model.pt + model.json
PSEUDO_LABELS = "pseudo_labels"  # a labelling stage's index PNGs, 255 = not kept
SUMMARY = "summary.json"  # the stage's final metrics, written by rank 0

# Which artifact of the upstream stage each input role reads.
ARTIFACT_OF_ROLE = {"init": CHECKPOINT, "model": CHECKPOINT, "aux_model": CHECKPOINT, "pseudo_labels": PSEUDO_LABELS, "snapshots": "snapshots"}


@dataclass(frozen=True)
class StageJob:
    pipeline: PipelineConfig
    stage_index: int
    output_dir: str
    inputs: dict[str, str] = field(default_factory=dict)  # role -> absolute artifact path
    tracking_uri: str | None = None
    run_id: str | None = None  # the stage's MLflow run

    @property
    def stage(self) -> StageConfig:
        return self.pipeline.stages[self.stage_index]

    @property
    def seed(self) -> int:
        return self.pipeline.seed

    def output(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def write_summary(self, summary: dict[str, Any]) -> None:
        path = self.output(SUMMARY)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.output(SUMMARY).read_text())


StageFn = Callable[[StageJob, Any], dict[str, Any]]
_STAGES: dict[str, StageFn] = {}


def register_stage(kind: str) -> Callable[[StageFn], StageFn]:
    def decorate(fn: StageFn) -> StageFn:
        if kind in _STAGES:
            raise ValueError(f"stage kind {kind!r} is registered twice")
        _STAGES[kind] = fn
        return fn

    return decorate


def stage_function(kind: str) -> StageFn:
    return _STAGES[kind]


def registered_stage_kinds() -> list[str]:
    return sorted(_STAGES)
