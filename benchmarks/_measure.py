"""Measuring helpers shared by the benchmarks: alternating-order timing and peak RSS of a call."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_above_baseline(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn``; return its result and the peak RSS above the level before, sampled every ms
    (torch's allocator is invisible to tracemalloc)."""
    gc.collect()
    baseline = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak, rss_bytes()) - baseline


def alternating_times(arms: dict[str, Callable[[], object]], repeats: int, *, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each arm over ``repeats`` rounds, the order reversed every other round
    (ABC, CBA, …) so a drift in machine speed favours no arm; one untimed call each first."""
    if warm_up:
        for fn in arms.values():
            fn()
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - started)
    return times


def measured_search(space_path, folder, name: str, overrides=()) -> dict:
    """Run one search (its own MLflow store and stage store in ``folder``) and read back what it cost and found:
    the best trial's selection and val mIoU, the stage runs it computed (cache misses) and their
    summed wall time, and per trial its sampled values, whether ASHA stopped it, and — for trials
    that ran every stage — the compute the search had spent when its value became known."""
    from pathlib import Path

    from mlflow import MlflowClient

    import selftune.stages  # noqa: F401  (registers the stage kinds)
    from selftune.search.driver import run_search
    from selftune.search.space import load_search_space

    folder = Path(folder)
    tracking_uri = f"sqlite:///{folder / f'{name}.db'}"
    space = load_search_space(space_path, [f"name={name}", *overrides])
    started = time.perf_counter()
    # Its own empty stage store: what another search (or arm) computed must not count as a hit here.
    outcome = run_search(space, tracking_uri=tracking_uri, out_root=folder / f"runs-{name}", store=folder / f"store-{name}",
                         progress=lambda line: None)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name).experiment_id

    def runs(kind: str) -> list:
        return client.search_runs([experiment], filter_string=f"tags.`selftune.kind` = '{kind}'", max_results=10_000)

    stages = [run for run in runs("stage") if run.info.end_time]
    computed = sorted((run for run in stages if run.data.tags.get("selftune.cache") == "miss"), key=lambda run: run.info.end_time)
    spent = [(run.info.end_time, (run.info.end_time - run.info.start_time) / 1000) for run in computed]

    def compute_by(moment: int) -> float:
        return sum(seconds for end, seconds in spent if end <= moment)

    all_trials, full = [], []
    for trial in runs("trial"):
        trial_id = trial.data.tags.get("selftune.trial_id")
        ended = max((run.info.end_time for run in stages if run.data.tags.get("selftune.trial_id") == trial_id), default=None)
        record = {"params": dict(trial.data.params), "stopped_early": "selftune.stopped_early" in trial.data.tags}
        all_trials.append(record)
        select = trial.data.metrics.get("select/miou")
        if trial.info.status == "FINISHED" and not record["stopped_early"] and select is not None and ended:
            full.append({**record, "select": select, "val": trial.data.metrics.get("val/miou", float("nan")),
                         "compute_when_known": compute_by(ended)})
    best = outcome.best
    return {"best_select": best.select_miou if best else float("nan"), "best_val": best.val_miou if best else float("nan"),
            "executions": len(computed), "compute_s": sum(seconds for _, seconds in spent), "wall_s": wall,
            "stopped": sum(t["stopped_early"] for t in all_trials), "trials": full, "all_trials": all_trials}
