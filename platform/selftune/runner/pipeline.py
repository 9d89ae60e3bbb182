"""A pipeline run: check the inputs, then run every stage under one MLflow pipeline run.

MLflow: the pipeline run has tag ``selftune.kind=pipeline`` (``final`` for a tuned final run);
params = the resolved pipeline, flattened; artifact ``pipeline.yaml``; metrics ``val/miou`` (the
last training stage's) plus the per-stage and per-round metrics the runner logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from selftune.config import PipelineConfig, StageConfig, flatten, pipeline_to_dict
from selftune.errors import ConfigError
from selftune.runner.cache import LinkedRunFolders, RunFolders, StageCache, default_store_root
from selftune.runner.runner import StageResult, Tracking, in_process, run_stages, terminates
from selftune.stages.data import prepare_data
from selftune.tracking import KIND_PIPELINE, RunTracker, create_run, ensure_experiment, require_reachable


@dataclass
class PipelineResult:
    run_id: str
    output_dir: str
    stages: list[StageResult] = field(default_factory=list)
    store: str | None = None  # the stage store the stages are in (None: the run's own folders, --no-cache)

    @property
    def val_miou(self) -> float | None:
        """The last training stage's val mIoU (measured at the epoch the selection images chose)."""
        return self._last("val/miou")

    @property
    def select_miou(self) -> float | None:
        return self._last("select/miou")

    def _last(self, key: str) -> float | None:
        values = [s.summary[key] for s in self.stages if key in s.summary]
        return values[-1] if values else None


def new_output_dir(out: str | Path | None, pipeline_name: str) -> Path:
    """A fresh folder for this run's outputs; an existing non-empty ``--out`` is refused so no
    earlier results are overwritten."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{pipeline_name}-{stamp}"
        suffix = 1
        while out.exists():
            suffix += 1
            out = Path("runs") / f"{pipeline_name}-{stamp}-{suffix}"
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose a new folder for the run's outputs")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: folder exists and is not empty; choose a new folder so earlier results stay intact")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_data(pipeline: PipelineConfig, source: str = "pipeline") -> None:
    """Open the dataset and split it (a bad dataset fails here, before any run exists); a stage
    that trains or labels on unlabelled images needs some."""
    data = prepare_data(pipeline.data, pipeline.seed)
    if data.unlabelled:
        return
    for stage in pipeline.stages:
        if stage.needs_unlabelled:
            raise ConfigError(
                f"{source}: stages.{stage.name}: a {stage.kind} stage needs unlabelled images, but data.labelled="
                f"{pipeline.data.labelled} labels all {len(data.labelled)} train images; label fewer"
            )


def run_pipeline(
    pipeline: PipelineConfig,
    *,
    out: str | Path | None,
    tracking_uri: str,
    experiment: str | None = None,
    on_stage_start: Callable[[int, StageConfig], None] | None = None,
    kind: str = KIND_PIPELINE,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    store: str | Path | None = None,
    use_store: bool = True,
) -> PipelineResult:
    """Validate inputs, then run every stage; MLflow runs end FAILED/KILLED if anything goes wrong.

    ``parent_run_id`` nests the pipeline run (a final run's candidates under it). The stages live
    in the stage store (``store``, default ``default_store_root()``), linked from the run's folder
    as ``<out>/<index>-<name>``, so runs, searches and finals that share a stage (same config,
    inputs, seed, code and data) compute it once. ``use_store=False`` (``--no-cache``) computes
    every stage into the run's own folders: the store is neither read nor written."""
    require_reachable(tracking_uri)  # fail fast on a tracking server that does not answer
    check_data(pipeline)
    output_dir = new_output_dir(out, pipeline.name)
    resolved = pipeline_to_dict(pipeline)
    (output_dir / "pipeline.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    experiment_id = ensure_experiment(tracking_uri, experiment or pipeline.name)
    run_id = create_run(
        tracking_uri, experiment_id, name=pipeline.name, kind=kind, parent_run_id=parent_run_id,
        tags={"selftune.pipeline": pipeline.name, "selftune.output_dir": str(output_dir), **(tags or {})},
    )
    tracker = RunTracker(tracking_uri, run_id)
    root = default_store_root(store) if use_store else None
    result = PipelineResult(run_id=run_id, output_dir=str(output_dir), store=str(root) if root else None)
    folders = LinkedRunFolders(output_dir, StageCache(root, owner=f"{kind} {output_dir}")) if root else RunFolders(output_dir)
    with terminates(tracking_uri, run_id):
        tracker.log_params(flatten(resolved))
        tracker.log_artifact(output_dir / "pipeline.yaml")
        result.stages = run_stages(
            pipeline, store=folders,
            execute=in_process(pipeline.resources, storage=lambda job: output_dir / "ray"),
            tracking=Tracking(tracking_uri, experiment_id, run_id, tags={}),
            on_stage_start=on_stage_start,
        )
        if result.val_miou is not None:
            tracker.log_metrics({"val/miou": result.val_miou, "select/miou": result.select_miou})
    return result
