"""The stage runner, above ``stages``: one way to run a pipeline's stages, shared by
``selftune run``, every search trial and ``selftune final`` (``runner.run_stages``), the stage
store it runs them into (``cache``: a run's own folders, or the content-addressed stage store that
runs, searches and finals share; ``store``: listing and pruning it),
and a whole pipeline run under MLflow (``pipeline.run_pipeline``)."""

from selftune.runner.cache import LinkedRunFolders, RunFolders, StageCache, default_store_root, stage_key, stage_keys
from selftune.runner.pipeline import PipelineResult, check_data, new_output_dir, run_pipeline
from selftune.runner.runner import (
    StageResult, Tracking, in_process, pipeline_metrics, record_reused_stage, round_metrics, run_stage_on_worker,
    run_stages, run_tracked_stage, terminates,
)

__all__ = [
    "LinkedRunFolders", "PipelineResult", "RunFolders", "StageCache", "default_store_root", "stage_keys", "StageResult", "Tracking", "check_data", "in_process",
    "new_output_dir", "pipeline_metrics", "record_reused_stage", "round_metrics", "run_pipeline",
    "run_stage_on_worker", "run_stages", "run_tracked_stage", "stage_key", "terminates",
]
