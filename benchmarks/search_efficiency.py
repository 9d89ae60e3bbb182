"""Search efficiency: the same budget with (a) TPE + ASHA + the stage cache and (b) random search
without ASHA or cache, in one run, on the synthetic data.

Prints, for each, the best val mIoU reached, the number of stage executions (cache misses) and the
compute seconds they took (summed stage wall times), and the ratios (a)/(b). The goal: (a) reaches
at least (b)'s best with at most half its compute.

    python benchmarks/search_efficiency.py [--space search_spaces/quickstart.yaml] [--samples 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

import selftune.stages  # noqa: F401
from selftune.search.driver import run_search
from selftune.search.space import load_search_space

REPO = Path(__file__).resolve().parent.parent


def measure(space_path: str, overrides: list[str], folder: Path, name: str) -> dict:
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    space = load_search_space(space_path, [f"name={name}", *overrides])
    started = time.perf_counter()
    outcome = run_search(space, tracking_uri=tracking_uri, out_root=folder / "runs", progress=lambda line: None)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name).experiment_id
    stages = client.search_runs([experiment], filter_string="tags.`selftune.kind` = 'stage'", max_results=10_000)
    computed = [run for run in stages if run.data.tags.get("selftune.cache") == "miss"]
    seconds = sum((run.info.end_time - run.info.start_time) / 1000 for run in computed if run.info.end_time)
    best = outcome.best.objective if outcome.best else float("nan")
    return {"best": best, "executions": len(computed), "compute_s": seconds, "wall_s": wall, "trials": len(outcome.rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    common = [f"budget.num_samples={args.samples}", f"searcher.seed={args.seed}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a = measure(args.space, [*common, "searcher.name=tpe", "scheduler.name=asha", "stage_cache=true"], folder, "a_tpe_asha_cache")
        b = measure(args.space, [*common, "searcher.name=random", "scheduler.name=none", "stage_cache=false"], folder, "b_random")
    print(f"\n{'':28}{'best val mIoU':>14}{'stage runs':>12}{'compute s':>11}{'wall s':>9}{'trials':>8}")
    for label, row in (("(a) TPE + ASHA + cache", a), ("(b) random, no ASHA/cache", b)):
        print(f"{label:28}{row['best']:>14.4f}{row['executions']:>12}{row['compute_s']:>11.1f}{row['wall_s']:>9.1f}{row['trials']:>8}")
    print(f"\nratios (a)/(b): best {a['best'] / b['best']:.3f}, stage runs {a['executions'] / b['executions']:.2f}, "
          f"compute {a['compute_s'] / b['compute_s']:.2f}, wall {a['wall_s'] / b['wall_s']:.2f}")
    goal = a["best"] >= b["best"] and a["compute_s"] <= 0.5 * b["compute_s"]
    print(f"goal (a reaches b's best with at most half the compute): {'met' if goal else 'not met'}")


if __name__ == "__main__":
    main()
