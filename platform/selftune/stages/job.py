"""A stage's work order: its typed config plus the explicit artifacts it reads and writes.

A stage is a function ``(job, ctx) -> summary`` registered with its config class
(``selftune.config.register_stage``). Inputs arrive as absolute paths chosen by the runner from
the stage's declared references; nothing is found by "newest file in a folder". Outputs go to
``job.output_dir`` (on storage every worker and the driver can read). The runner writes the
returned summary to ``summary.json`` *last*, after everything else the stage wrote: the file marks
a complete stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.config import ARTIFACT_FOLDERS, MODEL, PSEUDO_LABELS, SNAPSHOTS, PipelineConfig, StageConfig

CHECKPOINT = ARTIFACT_FOLDERS[MODEL]  # a training stage's best model: model.pt + model.json
PSEUDO_LABELS_FOLDER = ARTIFACT_FOLDERS[PSEUDO_LABELS]  # a labelling stage's index PNGs, 255 = not kept
SNAPSHOTS_FOLDER = ARTIFACT_FOLDERS[SNAPSHOTS]
SUMMARY = "summary.json"  # the stage's final metrics: written last, by the runner
RESULT = "result.json"  # what rank 0's stage function returned, handed from the workers to the runner


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

    @property
    def init_seed(self) -> int:
        """The torch seed a fresh network of this stage is drawn with (the same on every rank)."""
        return self.pipeline.seed + self.stage_index

    def output(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        path = self.output(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads(self.output(name).read_text())

    def read_summary(self) -> dict[str, Any]:
        return self.read_json(SUMMARY)


def artifact_path(stage_folder: Path, artifact: str) -> Path:
    """Where a stage's ``artifact`` lives inside its output folder."""
    return stage_folder / ARTIFACT_FOLDERS[artifact]
