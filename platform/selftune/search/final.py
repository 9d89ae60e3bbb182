"""``selftune final``: run a pipeline with a search's best values as a tuned final run.

The values come from the search run (``--from``: a search run id, or an experiment name for its
latest search) or from a YAML file of dotted keys (``--params``). Then the pipeline's ``final:``
section applies, e.g.::

    final:
      set: {stages.self_train.epochs: 24}   # more epochs than the search could afford
      seeds: [0, 1, 2]                      # one final run per seed; mean and spread are logged
      top_k: 3                              # re-run the search's 3 best trials on every seed

With ``top_k: 1`` (the default) each seed's run is a pipeline run tagged ``selftune.kind=final``
and linked to the best trial's run (``selftune.source_trial_run``); its last training stage's
model is registered in the MLflow Model Registry as ``selftune-<pipeline name>``.

With ``top_k > 1`` one parent run (``selftune.kind=final``) holds top_k × seeds pipeline runs
(``selftune.kind=final_seed``). One trial's objective is one draw of run-to-run noise, so the
configuration kept is the one with the best *mean* ``select/miou`` over the seeds — never
``val/miou``, which is only reported (mean ± std) — and only its model is registered.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from selftune.config import load_pipeline, parse_override, read_yaml, set_dotted
from selftune.runner import PipelineResult, new_output_dir, run_pipeline, terminates
from selftune.errors import ConfigError
from selftune.report import format_table, print_stage_table, stage_header
from selftune.search import pbt
from selftune.search.space import SearchSpace, load_search_space
from selftune.search.summary import find_search_run, trial_rows
from selftune.stages import CHECKPOINT
from selftune.tracking import RunTracker, client, create_run, ensure_experiment

KIND_FINAL = "final"
KIND_FINAL_SEED = "final_seed"  # one (configuration, seed) pipeline run under a top-k final run
FINAL_KEYS = {"set", "seeds", "top_k"}
SEED_METRICS = ("select/miou", "val/miou")  # logged as seeds/<metric>_mean and _std


@dataclass(frozen=True)
class FinalPlan:
    overrides: dict[str, Any]  # dotted keys -> values, on top of the searched values
    seeds: list[int | None]  # [None]: the pipeline's own seed
    top_k: int = 1


@dataclass
class Candidate:
    """One configuration a final run re-runs: a search trial's values, or a ``--params`` file's."""

    values: dict[str, Any]  # pipeline path -> value
    tags: dict[str, Any]
    label: str  # the trial id, or the params file
    objective: float | None = None  # the search's objective for this trial
    results: list[PipelineResult] = field(default_factory=list)  # one per seed

    def seed_values(self, metric: str) -> list[float]:
        return [value for value in (_metric(result, metric) for result in self.results) if value is not None]

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """Mean and sample std over the seeds (std None with fewer than two)."""
        values = self.seed_values(metric)
        if not values:
            return None, None
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def searched_space(tracking_uri: str, reference: str) -> tuple[Any, SearchSpace]:
    """The search run and its space (whose pipeline and ``set:`` every trial ran)."""
    run = find_search_run(tracking_uri, reference)
    space_file = run.data.tags.get("selftune.space", "")
    if not Path(space_file).is_file():
        raise ConfigError(f"search run {run.info.run_id}: its search space {space_file!r} is no longer there; use --params")
    return run, load_search_space(space_file)


def top_trials(tracking_uri: str, search_run: Any, space: SearchSpace, top_k: int, source: str) -> list[Candidate]:
    """The search's ``top_k`` best trials that ran every stage, best first, by the search objective."""
    rows = [row for row in trial_rows(tracking_uri, search_run)
            if row.status == "FINISHED" and row.objective is not None and math.isfinite(row.objective)]
    run_id = search_run.info.run_id
    if not rows:
        raise ConfigError(f"search run {run_id} has no best trial (no trial ran every stage); nothing to run")
    if top_k > len(rows):
        raise ConfigError(f"{source}: final.top_k: {top_k} is more than the {len(rows)} trials of search run {run_id} "
                          f"that ran every stage; valid: 1 to {len(rows)}")
    best_first = search_run.data.tags.get("selftune.mode", "max") == "max"
    ranked = sorted(rows, key=lambda row: row.objective, reverse=best_first)[:top_k]  # stable: ties keep start order
    return [
        Candidate(values={**space.config.set, **trial_values(search_run, space, row)},
                  tags={"selftune.source_search_run": run_id, "selftune.source_trial_run": row.run_id},
                  label=row.trial_id, objective=row.objective)
        for row in ranked
    ]


def trial_values(search_run: Any, space: SearchSpace, row: Any) -> dict[str, Any]:
    """The values a trial ran with: its sampled ones, or under PBT (whose values change inside a
    trial) its realised per-round schedule, from ``<search folder>/pbt/<trial id>.json``."""
    if not pbt.is_population_search(space):
        return space.values_for(_typed(row.params))
    folder = Path(search_run.data.tags.get("selftune.output_dir", "")) / "pbt"
    record = pbt.read_trial_record(str(folder), row.trial_id)
    if not record:
        raise ConfigError(f"search run {search_run.info.run_id}: trial {row.trial_id}'s schedule {folder / (row.trial_id + '.json')} "
                          "is no longer there; use --params")
    return record["schedule"]


def final_plan(raw_pipeline: dict[str, Any], source: str) -> FinalPlan:
    """The pipeline's ``final:`` section, checked: dotted overrides, seeds and top_k."""
    final = raw_pipeline.get("final") or {}
    unknown = set(final) - FINAL_KEYS
    if unknown:
        raise ConfigError(f"{source}: final.{sorted(unknown)[0]}: unknown key; valid keys are: {', '.join(sorted(FINAL_KEYS))}")
    overrides = final.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: final.set: must be a mapping of dotted keys to values")
    seeds = final.get("seeds") or [None]
    if not isinstance(seeds, list) or not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seeds):
        raise ConfigError(f"{source}: final.seeds: must be a list of integer seeds, got {seeds!r}")
    top_k = final.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"{source}: final.top_k: must be a positive integer (how many of the search's best trials "
                          f"to re-run), got {top_k!r}")
    return FinalPlan(overrides, seeds, top_k)


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
    store: str | None = None,
    use_store: bool = True,
) -> list[PipelineResult]:
    """``store``/``use_store``: the stage store the runs reuse and fill (``--store``, ``--no-cache``)."""
    if source:
        search_run, space = searched_space(tracking_uri, source)
        pipeline_file = pipeline_file or str(space.pipeline_path)
        experiment = experiment or client(tracking_uri).get_experiment(search_run.info.experiment_id).name
        plan = final_plan(_pipeline_with(pipeline_file, space.config.set, overrides), pipeline_file)
        candidates = top_trials(tracking_uri, search_run, space, plan.top_k, pipeline_file)
    else:
        if not pipeline_file:
            raise ConfigError("selftune final --params FILE needs the PIPELINE file too")
        values = read_yaml(params_file)
        plan = final_plan(_pipeline_with(pipeline_file, values, overrides), pipeline_file)
        if plan.top_k > 1:
            raise ConfigError(f"{pipeline_file}: final.top_k: {plan.top_k} needs a search to rank trials from (--from); "
                              "--params gives one configuration; valid: 1")
        candidates = [Candidate(values, {"selftune.params_file": str(Path(params_file).resolve())}, label=str(params_file))]
    base = Path(out) if out else _default_out(Path(pipeline_file).stem)
    common = {"plan": plan, "pipeline_file": pipeline_file, "overrides": overrides, "tracking_uri": tracking_uri,
              "experiment": experiment, "base": base, "progress": progress, "store": store, "use_store": use_store}
    if plan.top_k == 1:
        return run_seeds(candidates[0], **common)
    return run_top_k(candidates, **common)


def run_seeds(candidate: Candidate, *, plan: FinalPlan, pipeline_file: str, overrides: list[str], tracking_uri: str,
              experiment: str | None, base: Path, progress: Callable[[str], None], store: str | None = None,
              use_store: bool = True) -> list[PipelineResult]:
    """One configuration, one final run per seed, each registering its model (``top_k: 1``)."""
    settings = _settings(candidate, plan, overrides)
    for seed in plan.seeds:
        seeded = settings + ([f"seed={seed}"] if seed is not None else [])
        pipeline = load_pipeline(pipeline_file, seeded)
        folder = base / f"seed{pipeline.seed}" if len(plan.seeds) > 1 else base
        progress(f"selftune final: {pipeline_file} seed {pipeline.seed} with {', '.join(settings) or 'its own values'}")
        result = run_pipeline(
            pipeline, out=folder, tracking_uri=tracking_uri, store=store, use_store=use_store,
            experiment=experiment, kind=KIND_FINAL, tags={**candidate.tags, "selftune.seed": pipeline.seed},
            on_stage_start=lambda i, stage, n=len(pipeline.stages): progress(stage_header(i, n, stage)),
        )
        print_stage_table(result)
        register_model(tracking_uri, result, pipeline.name, crop_size=pipeline.data.crop_size)
        candidate.results.append(result)
    if len(candidate.results) > 1:
        _log_seed_spread(tracking_uri, candidate.results, progress)
    return candidate.results


def run_top_k(candidates: list[Candidate], *, plan: FinalPlan, pipeline_file: str, overrides: list[str],
              tracking_uri: str, experiment: str | None, base: Path, progress: Callable[[str], None],
              store: str | None = None, use_store: bool = True) -> list[PipelineResult]:
    """Every candidate on every seed under one parent final run; keep and register the one with
    the best mean ``select/miou``. The runs share the stage store: candidates that differ only
    downstream compute their common stages once per seed, and a seed the search ran reuses its
    trials' stages."""
    pipelines = [[load_pipeline(pipeline_file, _settings(c, plan, overrides) + _seed_setting(seed)) for seed in plan.seeds]
                 for c in candidates]  # all validated before any run exists
    first = pipelines[0][0]
    base = new_output_dir(base, first.name)
    experiment_id = ensure_experiment(tracking_uri, experiment or first.name)
    parent_id = create_run(tracking_uri, experiment_id, name=f"{first.name}-final-top{plan.top_k}", kind=KIND_FINAL,
                           tags={"selftune.pipeline": first.name, "selftune.output_dir": str(base),
                                 "selftune.source_search_run": candidates[0].tags["selftune.source_search_run"]})
    with terminates(tracking_uri, parent_id):
        parent = RunTracker(tracking_uri, parent_id)
        parent.log_params({"final.top_k": plan.top_k, "final.seeds": _yaml(plan.seeds),
                           **{f"top{rank}.trial_id": c.label for rank, c in enumerate(candidates, 1)}})
        for rank, (candidate, seeded) in enumerate(zip(candidates, pipelines), 1):
            for pipeline in seeded:
                progress(f"selftune final: top {rank}/{plan.top_k} (trial {candidate.label}, search objective "
                         f"{candidate.objective:.4f}) seed {pipeline.seed}")
                result = run_pipeline(
                    pipeline, out=base / f"top{rank}-seed{pipeline.seed}", tracking_uri=tracking_uri,
                    experiment=experiment, kind=KIND_FINAL_SEED, parent_run_id=parent_id, store=store, use_store=use_store,
                    tags={**candidate.tags, "selftune.seed": pipeline.seed, "selftune.final_rank": rank},
                    on_stage_start=lambda i, stage, n=len(pipeline.stages): progress(stage_header(i, n, stage)),
                )
                print_stage_table(result)
                candidate.results.append(result)
        chosen = choose(candidates)
        _log_candidates(parent, candidates, chosen)
        progress("\n" + format_candidates(candidates, chosen))
        # One model of the chosen configuration: its seed with the best select mIoU (never val).
        best_seed = max(range(len(chosen.results)), key=lambda i: _or_minus_inf(_metric(chosen.results[i], "select/miou")))
        registered = chosen.results[best_seed]
        register_model(tracking_uri, registered, first.name, crop_size=first.data.crop_size)
        parent.set_tags({"selftune.source_trial_run": chosen.tags["selftune.source_trial_run"],
                         "selftune.chosen_rank": candidates.index(chosen) + 1, "selftune.registered_run": registered.run_id})
        progress(f"registered selftune-{first.name} from run {registered.run_id} (the chosen configuration's seed "
                 f"{pipelines[candidates.index(chosen)][best_seed].seed}, its best select mIoU); MLflow final run {parent_id}")
    return [result for candidate in candidates for result in candidate.results]


def choose(candidates: list[Candidate]) -> Candidate:
    """The candidate with the best mean ``select/miou`` over its seeds (the first of equals)."""
    return max(candidates, key=lambda c: _or_minus_inf(c.mean_std("select/miou")[0]))


def format_candidates(candidates: list[Candidate], chosen: Candidate) -> str:
    headers = ["rank", "trial", "search objective", "select mIoU (mean ± std)", "val mIoU (mean ± std)", "val per seed", ""]
    rows = [
        [str(rank), c.label, _number(c.objective), _mean_std(*c.mean_std("select/miou")), _mean_std(*c.mean_std("val/miou")),
         " ".join(f"{v:.4f}" for v in c.seed_values("val/miou")), "← chosen (best mean select mIoU)" if c is chosen else ""]
        for rank, c in enumerate(candidates, 1)
    ]
    seeds = len(chosen.results)
    return format_table(headers, rows) + f"\n(std: sample standard deviation over {seeds} seed{'s' * (seeds != 1)})"


def _log_candidates(parent: RunTracker, candidates: list[Candidate], chosen: Candidate) -> None:
    """Mean and std over seeds: the chosen configuration's as ``seeds/<metric>_mean|_std``, every
    candidate's as ``top<rank>/seeds/...``."""
    metrics: dict[str, float] = {}
    for rank, candidate in enumerate(candidates, 1):
        spread = _spread_metrics(candidate)
        metrics.update({f"top{rank}/{name}": value for name, value in spread.items()})
        if candidate is chosen:
            metrics.update(spread)
    parent.log_metrics(metrics)


def _spread_metrics(candidate: Candidate) -> dict[str, float]:
    metrics = {}
    for metric in SEED_METRICS:
        mean, std = candidate.mean_std(metric)
        metrics.update({f"seeds/{metric}_mean": mean, f"seeds/{metric}_std": std})
    return {name: value for name, value in metrics.items() if value is not None}


def _settings(candidate: Candidate, plan: FinalPlan, overrides: list[str]) -> list[str]:
    """``--set`` texts: the candidate's values, then the final section's, then the command line's."""
    return [f"{k}={_yaml(v)}" for k, v in {**candidate.values, **plan.overrides}.items()] + list(overrides)


def _seed_setting(seed: int | None) -> list[str]:
    return [f"seed={seed}"] if seed is not None else []


def _pipeline_with(pipeline_file: str, values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The raw pipeline with ``values`` and the command line's ``--set`` applied (``final.top_k=3``
    on the command line changes the plan too)."""
    raw = read_yaml(pipeline_file)
    for key, value in [*values.items(), *(parse_override(text) for text in overrides)]:
        set_dotted(raw, key, value, pipeline_file)
    return raw


def _typed(params: dict[str, str]) -> dict[str, Any]:
    """MLflow stores params as strings; read them back as YAML values (numbers stay numbers)."""
    return {name: yaml.safe_load(value) for name, value in params.items()}


def _metric(result: PipelineResult, metric: str) -> float | None:
    return result.select_miou if metric == "select/miou" else result.val_miou


def _or_minus_inf(value: float | None) -> float:
    return -math.inf if value is None else value


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    return f"{_number(mean)} ± {_number(std)}"


def register_model(tracking_uri: str, result: PipelineResult, name: str, *, crop_size: int) -> None:
    """Log the last training stage's best model to the final run and register it; pin the stages
    it came from in the stage store, so that no prune breaks its lineage."""
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
        info = mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=f"selftune-{name}", input_example=example)
    client(tracking_uri).set_terminated(result.run_id, "FINISHED")  # start_run(run_id=...) reopened it
    pin_lineage(result, trained[-1], {"model": f"selftune-{name}", "version": str(getattr(info, "registered_model_version", "")),
                                      "run": result.run_id})


def pin_lineage(result: PipelineResult, model_stage: Any, pin: dict[str, Any]) -> None:
    """Keep the registered model's stage and every stage before it in the store (no prune deletes them)."""
    if not result.store:
        return
    from selftune.runner import StageCache

    store = StageCache(result.store)
    for stage in result.stages[: result.stages.index(model_stage) + 1]:
        store.pin(stage.name, stage.key, pin)


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


__all__ = ["Candidate", "FinalPlan", "choose", "final_plan", "run_final", "searched_space", "top_trials"]
