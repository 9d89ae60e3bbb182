"""The method table, honestly measured: each method pipeline and, beside it, a supervised control
trained for the same total number of optimiser steps from the same start, on several seeds.

For every (method, seed) it runs ``selftune run pipelines/<method>.yaml --set seed=S`` and the
control: the same data, model, resources and seed, one ``supervised`` stage with the method's
first training stage's batch size, optimiser and class weights, for as many steps as all the
method's segmentation-network training stages together (the auxiliary network's steps in
``auxnet`` train another network and are not counted). Both keep their best epoch on the
selection images (``data.selection``, 20 by default) and report val mIoU on the rest.

Resumable: every finished run is written to ``<out>/results.json`` at once, and a rerun with the
same ``--out`` skips the (method, seed, arm) runs already there; an interrupted run's folder is
started afresh. ``--jobs`` runs (default 2) go at a time, one thread each. Prints the table and
the wall time.

    python benchmarks/methods_table.py [--out runs/methods-table] [--seeds 0 1 2] [--methods dst_cbc u2pl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from selftune.config import TrainingStageConfig, load_pipeline, read_yaml
import selftune.stages  # noqa: F401  (registers the methods' stage kinds)

REPO = Path(__file__).resolve().parent.parent
# Quickest first (wall time of one run on a quiet machine), so a table cut short has the most rows.
METHODS = ("three_stage", "u2pl", "st_plus_plus", "dst_cbc", "saug_dsbn_scl", "auxnet")
ARMS = ("method", "control")
PSEUDO_KEYS = ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage")


def training_steps(pipeline_file: Path) -> int:
    """Optimiser steps of the segmentation network over all the pipeline's training stages."""
    pipeline = load_pipeline(pipeline_file)
    stages = [stage for stage in pipeline.stages if isinstance(stage, TrainingStageConfig)]
    if any(stage.steps_per_epoch is None for stage in stages):
        raise SystemExit(f"{pipeline_file}: a training stage has steps_per_epoch: null; the control needs a fixed count")
    return sum(stage.epochs * stage.steps_per_epoch for stage in stages)


def epochs_for(total_steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps per epoch) giving exactly ``total_steps``, steps per epoch as close to the
    method's first stage as divides the total (the control evaluates about as often)."""
    for steps in range(steps_per_epoch, 0, -1):
        if total_steps % steps == 0:
            return total_steps // steps, steps
    raise AssertionError("1 divides every total")


def control_pipeline(pipeline_file: Path) -> dict[str, Any]:
    """The method's pipeline with its stages replaced by one supervised stage of equal steps."""
    raw = read_yaml(pipeline_file)
    first = next(s for s in load_pipeline(pipeline_file).stages if isinstance(s, TrainingStageConfig))
    epochs, steps_per_epoch = epochs_for(training_steps(pipeline_file), first.steps_per_epoch)
    stage = {"name": "supervised", "kind": "supervised", "epochs": epochs, "steps_per_epoch": steps_per_epoch,
             "batch_size": first.batch_size, "optimizer": first.optimizer.model_dump(mode="json")}
    if hasattr(first, "class_weights"):
        stage.update(class_weights=first.class_weights, class_weight_c=first.class_weight_c)
    raw.pop("final", None)
    return {**raw, "name": f"{raw['name']}_control", "description": f"equal-step supervised control for {raw['name']}",
            "stages": [stage]}


def run_arm(pipeline_file: Path, seed: int, folder: Path, *, selection: str, tracking_uri: str, threads: int) -> dict[str, Any]:
    """One ``selftune run`` as a user would type it; its numbers read back from the stage summaries."""
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted earlier attempt: --out must be new or empty
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "selftune", "run", str(pipeline_file), "--set", f"seed={seed}",
               "--set", f"data.selection={selection}", "--out", str(folder),
               "--tracking-uri", tracking_uri, "--experiment", "methods_table",
               "--no-cache"]  # every run computes its stages: a stage store hit would be no measurement
    started = time.perf_counter()
    log = folder.with_suffix(".log")
    with open(log, "w") as out:
        # Fixed threads: on a loaded machine two OpenMP threads per run wait on each other at every
        # barrier (measured under load 8: 0.6 s/step with one thread, 1.2-4.3 s with two).
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); see {log}")
    return {**read_summaries(folder), "wall_s": round(time.perf_counter() - started, 1), "threads": threads}


def read_summaries(folder: Path) -> dict[str, Any]:
    """The last training stage's select/val mIoU and the last labelling stage's label quality."""
    summaries = [json.loads((stage / "summary.json").read_text())
                 for stage in sorted(folder.glob("[0-9]*-*"), key=lambda p: int(p.name.split("-")[0]))]
    trained = [s for s in summaries if "val/miou" in s]
    labelled = [s for s in summaries if "pseudo_label/miou" in s]
    numbers = {"val/miou": trained[-1]["val/miou"], "select/miou": trained[-1].get("select/miou")}
    numbers.update({key: labelled[-1][key] for key in PSEUDO_KEYS} if labelled else {})
    return numbers


def pending_runs(results: dict[str, Any], methods: list[str], seeds: list[int], threads: int, out: Path) -> list[tuple]:
    """(method, seed, arm, pipeline file) still to run, method-major: a table cut short still has
    complete rows. A run done with another thread count is redone, so a table uses one setting."""
    pending = []
    for method in methods:
        method_file = REPO / "pipelines" / f"{method}.yaml"
        control_file = out / "pipelines" / f"{method}_control.yaml"
        control_file.write_text(yaml.safe_dump(control_pipeline(method_file), sort_keys=False))
        for seed in seeds:
            for arm, pipeline_file in zip(ARMS, (method_file, control_file), strict=True):
                if results.get(method, {}).get(str(seed), {}).get(arm, {}).get("threads") != threads:
                    pending.append((method, seed, arm, pipeline_file))
    return pending


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def table_rows(results: dict[str, Any], methods: list[str], seeds: list[int]) -> list[list[str]]:
    rows = []
    for method in methods:
        done = [results.get(method, {}).get(str(seed), {}) for seed in seeds]
        done = [pair for pair in done if all(arm in pair for arm in ARMS)]
        if not done:
            continue
        ours, control = (mean_std([pair[arm]["val/miou"] for pair in done]) for arm in ARMS)
        gains = [pair["method"]["val/miou"] - pair["control"]["val/miou"] for pair in done]
        gain = statistics.mean(gains)
        beyond = abs(gain) > max(ours[1], control[1]) if len(done) > 1 else False
        labels = " / ".join(f"{statistics.mean(p['method'][key] for p in done):.3f}" for key in PSEUDO_KEYS) \
            if all(PSEUDO_KEYS[0] in p["method"] for p in done) else "-"
        verdict = ("yes" if gain > 0 else "worse") if beyond else ("no" if len(done) > 1 else "- (one seed)")
        rows.append([method, str(len(done)), _mean_std(*ours), _mean_std(*control), f"{gain:+.4f}", verdict, labels,
                     f"{statistics.mean(p['method']['wall_s'] + p['control']['wall_s'] for p in done):.0f}"])
    return rows


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f} (one seed)"


def format_markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


HEADERS = ["method", "seeds", "val mIoU (mean ± std)", "control (mean ± std)", "gain", "beyond 1 std",
           "last pseudo labels: mIoU / kept / coverage (mean)", "s per seed (both arms)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "methods-table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one thread each on 2 cores)")
    parser.add_argument("--selection", default="20", help="data.selection for every run (default 20; 'val' is optimistic)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    (out / "pipelines").mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    started = time.perf_counter()
    lock = threading.Lock()  # results and results.json are shared by the --jobs runs

    def run_one(method: str, seed: int, arm: str, pipeline_file: Path) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {method} seed {seed}: {arm} ...", flush=True)
        numbers = run_arm(pipeline_file, seed, out / "runs" / f"{method}-seed{seed}-{arm}",
                          selection=args.selection, tracking_uri=tracking_uri, threads=args.threads)
        print(f"[{time.perf_counter() - started:6.0f} s] {method} seed {seed}: {arm} val mIoU {numbers['val/miou']:.4f} "
              f"in {numbers['wall_s']:.0f} s", flush=True)
        with lock:
            results.setdefault(method, {}).setdefault(str(seed), {})[arm] = numbers
            results_file.write_text(json.dumps(results, indent=1))

    pending = pending_runs(results, args.methods, args.seeds, args.threads, out)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, *task) for task in pending]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the first failure stops the table (its log is named)
            raise
    print(f"\n{format_markdown(HEADERS, table_rows(results, args.methods, args.seeds))}")
    every_run = sum(arm["wall_s"] for seeds in results.values() for pair in seeds.values() for arm in pair.values())
    print(f"\nthis invocation: {time.perf_counter() - started:.0f} s wall; all {sum(len(p) for s in results.values() for p in s.values())} "
          f"runs in {results_file.name}: {every_run:.0f} s of run wall time; data.selection={args.selection}, {args.threads} thread(s) per run, {args.jobs} run(s) at a time")


if __name__ == "__main__":
    main()
