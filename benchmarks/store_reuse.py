"""Stage store reuse across searches: two searches of one space into one stage store, the second
with another searcher seed (other values for everything but what the space shares), then one
`selftune run` of the pipeline. Prints, for each, stage runs computed (misses), reused (hits),
compute seconds (summed wall times of the computed stages) and wall seconds.

    python benchmarks/store_reuse.py [--space search_spaces/quickstart.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

import selftune.stages  # noqa: F401
from selftune.config import load_pipeline
from selftune.runner import run_pipeline
from selftune.search.driver import run_search
from selftune.search.space import load_search_space

REPO = Path(__file__).resolve().parent.parent


def stage_counts(tracking_uri: str, experiment: str) -> dict:
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    stages = client.search_runs([experiment_id], filter_string="tags.`selftune.kind` = 'stage'", max_results=10_000)
    computed = [run for run in stages if run.data.tags.get("selftune.cache") == "miss"]
    seconds = sum((run.info.end_time - run.info.start_time) / 1000 for run in computed if run.info.end_time)
    hits = [run for run in stages if run.data.tags.get("selftune.cache") == "hit"]
    durations = {run.data.tags["selftune.cache_key"]: (run.info.end_time - run.info.start_time) / 1000
                 for run in computed if run.info.end_time}
    return {"misses": len(computed), "hits": len(hits), "hit_stages": sorted({run.data.tags["selftune.stage"] for run in hits}),
            "compute_s": seconds, "hit_keys": [run.data.tags["selftune.cache_key"] for run in hits], "durations": durations}


def saved_s(row: dict, earlier: list[dict]) -> float:
    """What the stages reused from earlier searches or runs had cost there: each once (without the
    shared store the search would have computed each of them once, its own trials reusing it)."""
    durations = {key: value for other in earlier for key, value in other["durations"].items()}
    return sum(durations.get(key, 0.0) for key in set(row["hit_keys"]))


def search(space_path: str, overrides: list[str], folder: Path, name: str) -> dict:
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    space = load_search_space(space_path, [f"name={name}", *overrides])
    started = time.perf_counter()
    run_search(space, tracking_uri=tracking_uri, out_root=folder / "runs", progress=lambda line: None)
    return {**stage_counts(tracking_uri, name), "wall_s": time.perf_counter() - started}


def single_run(space_path: str, overrides: list[str], folder: Path) -> dict:
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    space = load_search_space(space_path, overrides)
    sets = [f"{key}={value}" for key, value in space.config.set.items()]
    pipeline = load_pipeline(space.pipeline_path, sets + [o for o in overrides if o.startswith(("stages.", "data."))])
    started = time.perf_counter()
    run_pipeline(pipeline, out=folder / "run", tracking_uri=tracking_uri, experiment="run")
    return {**stage_counts(tracking_uri, "run"), "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["SELFTUNE_STAGE_STORE"] = str(folder / "stages")
        first = search(args.space, [*args.overrides, "searcher.seed=0"], folder, "first")
        second = search(args.space, [*args.overrides, "searcher.seed=1"], folder, "second")
        run = single_run(args.space, args.overrides, folder)
    print(f"\n{'':26}{'computed':>9}{'reused':>8}{'compute s':>11}{'saved s':>9}{'wall s':>9}  reused stages")
    rows = (("first search (seed 0)", first, []), ("second search (seed 1)", second, [first]), ("selftune run after", run, [first, second]))
    for label, row, earlier in rows:
        print(f"{label:26}{row['misses']:>9}{row['hits']:>8}{row['compute_s']:>11.1f}{saved_s(row, earlier):>9.1f}"
              f"{row['wall_s']:>9.1f}  {', '.join(row['hit_stages']) or '-'}")
    print("(saved s: what the stages reused from an earlier search or run took to compute there, each once)")
    saved = saved_s(second, [first])
    print(f"second search: {second['compute_s']:.1f} s computed instead of {second['compute_s'] + saved:.1f} s "
          f"({saved / (second['compute_s'] + saved):.0%} less compute)")


if __name__ == "__main__":
    main()
