"""``selftune final``: run a pipeline with a search's best values as a tuned final run.

The best trial's values come from the search run (``--from``: a search run id, or an experiment
name for its latest search) or from a YAML file of dotted keys (``--params``). Then the pipeline's
``final:`` section applies, e.g.::

    final:
      set: {stages.self_train.epochs: 24}   # more epochs than the search could afford
      seeds: [0, 1, 2]                      # one final run per seed; mean and spread are logged

Each run is a pipeline run tagged ``selftune.kind=final`` and linked to the source trial's run
(``selftune.source_trial_run``); its last training stage's model is registered in the MLflow
Model Registry as ``selftune-<pipeline name>``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import yaml

from selftune.config import load_pipeline, read_yaml, set_dotted
from selftune.runner import PipelineResult, run_pipeline
from selftune.errors import ConfigError
from selftune.report import print_stage_table, stage_header
from selftune.search.space import load_search_space
from selftune.search.summary import find_search_run
from selftune.stages import CHECKPOINT
from selftune.tracking import RunTracker, client

KIND_FINAL = "final"
FINAL_KEYS = {"set", "seeds"}


def best_values(tracking_uri: str, reference: str) -> tuple[dict[str, Any], str, Any]:
    """(pipeline path -> value, pipeline file, search run) of a finished search's best trial: the
    space's fixed ``set:`` values and the trial's sampled ones, i.e. the pipeline the trial ran."""
    run = find_search_run(tracking_uri, reference)
    tags = run.data.tags
    if "selftune.best_trial_run_id" not in tags:
        raise ConfigError(f"search run {run.info.run_id} has no best trial (no trial ran every stage); nothing to run")
    space_file = tags.get("selftune.space", "")
    if not Path(space_file).is_file():
        raise ConfigError(f"search run {run.info.run_id}: its search space {space_file!r} is no longer there; use --params")
    space = load_search_space(space_file)
    schedule = tags.get("selftune.best_schedule")
    if schedule:  # PBT: the values the best trial ran with, round by round (its own values changed mid-run)
        if not Path(schedule).is_file():
            raise ConfigError(f"search run {run.info.run_id}: its best schedule {schedule!r} is no longer there; use --params")
        return {**space.config.set, **read_yaml(schedule)}, str(space.pipeline_path), run
    sample = {name.removeprefix("best."): yaml.safe_load(value) for name, value in run.data.params.items() if name.startswith("best.")}
    return {**space.config.set, **space.values_for(sample)}, str(space.pipeline_path), run


def final_plan(raw_pipeline: dict[str, Any], source: str) -> tuple[dict[str, Any], list[int | None]]:
    """The pipeline's ``final:`` section as (dotted overrides, seeds); seeds ``[None]`` keeps the pipeline's."""
    final = raw_pipeline.get("final") or {}
    unknown = set(final) - FINAL_KEYS
    if unknown:
        raise ConfigError(f"{source}: final.{sorted(unknown)[0]}: unknown key; valid keys are: seeds, set")
    overrides = final.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: final.set: must be a mapping of dotted keys to values")
    seeds = final.get("seeds") or [None]
    if not isinstance(seeds, list) or not all(s is None or isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: final.seeds: must be a list of integer seeds, got {seeds!r}")
    return overrides, seeds


def run_final(
    *,
    source: str | None,
    params_file: str | None,
    pipeline_file: str | None,
    overrides: list[str],
    tracking_uri: str,
    experiment: str | None = None,
    out: str | None = None,
    progress: Callable[[str], None] = print,
) -> list[PipelineResult]:
    tags: dict[str, Any] = {}
    if source:
        values, searched_pipeline, search_run = best_values(tracking_uri, source)
        pipeline_file = pipeline_file or searched_pipeline
        experiment = experiment or client(tracking_uri).get_experiment(search_run.info.experiment_id).name
        tags = {"selftune.source_search_run": search_run.info.run_id,
                "selftune.source_trial_run": search_run.data.tags["selftune.best_trial_run_id"]}
    else:
        if not pipeline_file:
            raise ConfigError("selftune final --params FILE needs the PIPELINE file too")
        values = read_yaml(params_file)
        tags = {"selftune.params_file": str(Path(params_file).resolve())}
    raw = read_yaml(pipeline_file)
    for key, value in values.items():
        set_dotted(raw, key, value, pipeline_file)
    final_overrides, seeds = final_plan(raw, pipeline_file)
    settings = [f"{k}={_yaml(v)}" for k, v in {**values, **final_overrides}.items()] + list(overrides)
    results = []
    base = Path(out) if out else _default_out(Path(pipeline_file).stem)
    for seed in seeds:
        seeded = settings + ([f"seed={seed}"] if seed is not None else [])
        pipeline = load_pipeline(pipeline_file, seeded)
        folder = base / f"seed{pipeline.seed}" if len(seeds) > 1 else base
        progress(f"selftune final: {pipeline_file} seed {pipeline.seed} with {', '.join(settings) or 'its own values'}")
        result = run_pipeline(
            pipeline, out=folder, tracking_uri=tracking_uri,
            experiment=experiment, kind=KIND_FINAL, tags={**tags, "selftune.seed": pipeline.seed},
            on_stage_start=lambda i, stage, n=len(pipeline.stages): progress(stage_header(i, n, stage)),
        )
        print_stage_table(result)
        register_model(tracking_uri, result, pipeline.name, crop_size=pipeline.data.crop_size)
        results.append(result)
    if len(results) > 1:
        _log_seed_spread(tracking_uri, results, progress)
    return results


def register_model(tracking_uri: str, result: PipelineResult, name: str, *, crop_size: int) -> None:
    """Log the last training stage's best model to the final run and register it."""
    import mlflow
    import numpy as np

    from selftune.models.checkpoint import load_checkpoint

    trained = [stage for stage in result.stages if (Path(stage.output_dir) / CHECKPOINT).is_dir()]
    if not trained:
        return
    model, _ = load_checkpoint(Path(trained[-1].output_dir) / CHECKPOINT)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=result.run_id):
        # MLflow 3 saves an exported (traced) graph, which needs an example input: one crop.
        example = np.zeros((1, 3, crop_size, crop_size), dtype=np.float32)
        mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=f"selftune-{name}", input_example=example)
    client(tracking_uri).set_terminated(result.run_id, "FINISHED")  # start_run(run_id=...) reopened it


def _log_seed_spread(tracking_uri: str, results: list[PipelineResult], progress) -> None:
    values = [r.val_miou for r in results if r.val_miou is not None]
    if len(values) < 2:
        return
    mean, spread = statistics.mean(values), statistics.stdev(values)
    progress(f"\nval mIoU over {len(values)} seeds: {mean:.4f} ± {spread:.4f} (sample std)")
    for result in results:
        RunTracker(tracking_uri, result.run_id).log_metrics({"seeds/val/miou_mean": mean, "seeds/val/miou_std": spread})


def _default_out(name: str) -> Path:
    import time

    return Path("runs") / f"{name}-final-{time.strftime('%Y%m%d-%H%M%S')}"


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


__all__ = ["run_final", "best_values", "final_plan"]
