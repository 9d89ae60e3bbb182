"""The search's results, read back from MLflow (completed from Tune's own results when MLflow
missed some): the table ``selftune search`` ends with and ``selftune show`` prints later, the CSV,
the plots and Optuna's parameter importances."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import ConfigError
from selftune.report import format_table
from selftune.tracking import client

KIND_SEARCH = "search"


STAGE_SUFFIXES = ("/select/miou", "/val/miou", "/pseudo_label/miou")  # per-stage columns of the trial table


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    status: str  # FINISHED, STOPPED (early, by the scheduler), FAILED, KILLED, RUNNING
    params: dict[str, str]
    stage_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {val/miou, pseudo_label/miou}
    objective: float | None = None
    select_miou: float | None = None  # the last training stage's, at its chosen epoch
    val_miou: float | None = None  # the same checkpoint on the reported val images
    cache_hits: int = 0
    error: str | None = None
    started: int = 0  # ms since the epoch: rows are listed in the order trials started


def find_search_run(tracking_uri: str, reference: str) -> Any:
    """The search run named by a run id or an experiment name (its most recent search)."""
    mlflow = client(tracking_uri)
    try:
        run = mlflow.get_run(reference)
        if run.data.tags.get("selftune.kind") == KIND_SEARCH:
            return run
    except Exception:  # noqa: BLE001 - not a run id: try it as an experiment name
        pass
    experiment = mlflow.get_experiment_by_name(reference)
    if experiment is None:
        raise ConfigError(f"{reference!r}: neither a search run id nor an MLflow experiment name in {tracking_uri}")
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`selftune.kind` = '{KIND_SEARCH}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise ConfigError(f"experiment {reference!r} has no selftune search runs")
    return runs[0]


def trial_rows(tracking_uri: str, search_run) -> list[TrialRow]:
    mlflow = client(tracking_uri)
    runs = mlflow.search_runs(
        [search_run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{search_run.info.run_id}' and tags.`selftune.kind` = 'trial'",
        max_results=10_000,
    )
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        status = "STOPPED" if tags.get("selftune.stopped_early") else run.info.status
        stage_metrics: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            for suffix in STAGE_SUFFIXES:
                if key.endswith(suffix) and key.count("/") == suffix.count("/"):
                    stage_metrics.setdefault(key.removesuffix(suffix), {})[suffix[1:]] = value
        rows.append(TrialRow(
            trial_id=tags.get("selftune.trial_id", run.info.run_id), run_id=run.info.run_id, status=status,
            params=dict(run.data.params), stage_metrics=stage_metrics,
            objective=metrics.get("objective"), cache_hits=int(metrics.get("cache_hits", 0)),
            select_miou=metrics.get("select/miou"), val_miou=metrics.get("val/miou"),
            error=tags.get("selftune.error"), started=run.info.start_time or 0,
        ))
    return sorted(rows, key=lambda row: (row.started, row.trial_id))


def reported_rows(results) -> list[TrialRow]:
    """The trial table from Tune's own results (a ``ResultGrid``): every value the trials reported,
    whatever reached MLflow. Status: FAILED (an error), FINISHED (every stage ran) or STOPPED."""
    rows = []
    for result in results:
        last = result.metrics or {}
        if "trial_id" not in last:
            continue  # never reported (failed before its first stage ended): MLflow has its error
        stage_metrics: dict[str, dict[str, float]] = {}
        history = result.metrics_dataframe
        for record in ([] if history is None else history.to_dict("records")):
            for key, value in record.items():
                for suffix in STAGE_SUFFIXES:
                    if isinstance(key, str) and key.endswith(suffix) and key.count("/") == suffix.count("/") \
                            and isinstance(value, (int, float)) and math.isfinite(value):
                        stage_metrics.setdefault(key.removesuffix(suffix), {})[suffix[1:]] = float(value)
        finished = last.get("stage") == last.get("stages_total")
        rows.append(TrialRow(
            trial_id=last["trial_id"], run_id=last.get("trial_run_id") or "",
            status="FAILED" if result.error else ("FINISHED" if finished else "STOPPED"),
            params={key: str(value) for key, value in (result.config or {}).items()}, stage_metrics=stage_metrics,
            objective=last.get("objective"), cache_hits=int(last.get("cache_hits", 0)),
            select_miou=last.get("select/miou"), val_miou=last.get("val/miou"),
            error=f"{type(result.error).__name__}: {result.error}" if result.error else None,
        ))
    return rows


def merge_rows(logged: list[TrialRow], reported: list[TrialRow], prefer_reported: bool) -> list[TrialRow]:
    """MLflow's rows completed by Tune's: a trial MLflow lacks comes from Tune, a missing value is
    filled in, and with ``prefer_reported`` (MLflow missed some logging) Tune's values win."""
    rows = {row.trial_id: row for row in logged}
    for new in reported:
        old = rows.get(new.trial_id)
        if old is None:
            rows[new.trial_id] = new
            continue
        first, second = (new, old) if prefer_reported else (old, new)
        old.params = {**second.params, **first.params}
        for stage in {*old.stage_metrics, *new.stage_metrics}:
            old.stage_metrics[stage] = {**second.stage_metrics.get(stage, {}), **first.stage_metrics.get(stage, {})}
        old.objective = first.objective if first.objective is not None else second.objective
        old.select_miou = first.select_miou if first.select_miou is not None else second.select_miou
        old.val_miou = first.val_miou if first.val_miou is not None else second.val_miou
        old.cache_hits = max(old.cache_hits, new.cache_hits)
        if old.status == "RUNNING" or (prefer_reported and old.status in ("FINISHED", "STOPPED")):
            old.status = new.status  # MLflow may not have been told how the trial ended
    return list(rows.values())  # MLflow's rows in start order, then those only Tune has, in Tune's (creation) order


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial that ran every stage (a trial stopped early reports a partial value)."""
    finished = [row for row in rows if row.status == "FINISHED" and row.objective is not None and math.isfinite(row.objective)]
    if not finished:
        return None
    return (max if mode == "max" else min)(finished, key=lambda row: row.objective)


def format_rows(rows: list[TrialRow]) -> str:
    params = sorted({name for row in rows for name in row.params})
    short = short_names(params)
    columns: list[tuple[str, str]] = []  # (stage, metric) pairs some trial has
    for row in rows:
        for stage, values in row.stage_metrics.items():
            columns += [(stage, metric) for metric in values if (stage, metric) not in columns]
    label = {"select/miou": "sel", "val/miou": "val", "pseudo_label/miou": "PL"}
    headers = ["trial", *[short[p] for p in params], *[f"{stage} {label[metric]}" for stage, metric in columns],
               "objective", "cache hits", "status"]
    table = [
        [row.trial_id, *[_short_value(row.params.get(p, "-")) for p in params],
         *[_number(row.stage_metrics.get(stage, {}).get(metric)) for stage, metric in columns],
         _number(row.objective), str(row.cache_hits), row.status]
        for row in rows
    ]
    return format_table(headers, table)


def best_line(row: TrialRow) -> str:
    """The best trial's selection value, its val value and the gap: how optimistic choosing was."""
    if row.select_miou is None or row.val_miou is None:
        return f"best trial {row.trial_id}: objective {_number(row.objective)}"
    gap = row.select_miou - row.val_miou
    line = (f"best trial {row.trial_id}: select mIoU {row.select_miou:.4f} (what the search maximised), "
            f"val mIoU {row.val_miou:.4f} on the reported images, gap {gap:+.4f}")
    if row.select_miou == row.val_miou:
        line += " (data.selection: val — chosen on the reported set itself, so the val mIoU is optimistic)"
    return line


def short_names(names: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that still tells each name apart: ``stages.self_train.optimizer.lr``
    becomes ``self_train.optimizer.lr`` next to ``stages.supervised.optimizer.lr``, else ``lr``."""
    short = {}
    for name in names:
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if sum(other == suffix or other.endswith("." + suffix) for other in names) == 1:
                break
        short[name] = suffix
    return short


def write_csv(rows: list[TrialRow], path: Path) -> Path:
    params = sorted({name for row in rows for name in row.params})
    stages = sorted({name for row in rows for name in row.stage_metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "run_id", "status", "objective", "cache_hits", *params,
                         *[f"{s}/{k}" for s in stages for k in ("select/miou", "val/miou", "pseudo_label/miou")]])
        for row in rows:
            writer.writerow([row.trial_id, row.run_id, row.status, row.objective, row.cache_hits,
                             *[row.params.get(p, "") for p in params],
                             *[row.stage_metrics.get(s, {}).get(k, "") for s in stages for k in ("select/miou", "val/miou", "pseudo_label/miou")]])
    return path


def plot_search(rows: list[TrialRow], path: Path) -> Path:
    """Objective per trial (in trial order), and pseudo-label mIoU per stage across trials."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for status, marker in (("FINISHED", "o"), ("STOPPED", "x"), ("FAILED", "s")):
        points = [(i, row.objective) for i, row in enumerate(rows) if row.status == status and row.objective is not None]
        if points:
            left.scatter(*zip(*points), marker=marker, label=status.lower())
    left.set(xlabel="trial", ylabel="objective", title="objective per trial")
    left.legend()
    stages = sorted({s for row in rows for s, v in row.stage_metrics.items() if "pseudo_label/miou" in v})
    for stage in stages:
        points = [(i, row.stage_metrics[stage]["pseudo_label/miou"]) for i, row in enumerate(rows)
                  if "pseudo_label/miou" in row.stage_metrics.get(stage, {})]
        right.plot(*zip(*points), marker="o", linestyle="", label=stage)
    right.set(xlabel="trial", ylabel="pseudo-label mIoU", title="pseudo-label quality per stage")
    if stages:
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _short_value(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value if len(value) <= 24 else value[:21] + "..."
    return value if number.is_integer() and "." not in value else f"{number:.4g}"
