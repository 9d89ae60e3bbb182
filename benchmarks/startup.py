"""Start-up: ``selftune run`` of the quickstart cut to 1 step per training stage vs a bare script
doing the same work, each a fresh process, alternating.

(a) ``python -m selftune run pipelines/quickstart.yaml`` with every training stage at 1 epoch of
    1 step and ``--unlabelled`` images to label (``data.labelled`` = the rest of train), a fresh
    output folder and a fresh MLflow SQLite file per call (a first run's cost).
(b) ``benchmarks/_startup_bare.py``: the same work (same data and model code) without Ray, MLflow
    or the stage runner.

Rounds alternate the order (ab, ba, …) after one untimed call of each; min / median / max wall
seconds per arm, the ratio of medians (goal <= 1.5) and each arm's CPU seconds (user + system of
the child process: on a machine shared with other work wall time drifts, CPU time much less).
Then a breakdown, each a fresh process, medians over ``--repeats``: ``import torch``, ``import
selftune.cli``, ``selftune --help``, ``import ray.train`` and ``mlflow``, and opening a fresh MLflow
store (``ensure_experiment``); the stages' wall times come from (a)'s own stage table.

    PYTHONPATH=platform python benchmarks/startup.py [--repeats 3] [--unlabelled 8]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipelines" / "quickstart.yaml"
TRAIN_IMAGES = 1000  # the synthetic dataset's train split (pipelines/quickstart.yaml)


def one_step_overrides(unlabelled: int) -> list[str]:
    sets = [f"data.labelled={TRAIN_IMAGES - unlabelled}"]
    for stage in ("supervised", "self_train"):
        sets += [f"stages.{stage}.epochs=1", f"stages.{stage}.steps_per_epoch=1"]
    return [arg for item in sets for arg in ("--set", item)]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system of the child) and the output of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def stage_seconds(output: str) -> dict[str, float]:
    """The wall-time column of ``selftune run``'s stage table."""
    rows = re.findall(r"^(\S+)\s+\S+\s.*?\s(\d+(?:\.\d+)?)s\s*$", output, flags=re.MULTILINE)
    return {name: float(seconds) for name, seconds in rows if name not in ("stage",)}


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


BREAKDOWN = {
    "import torch": python("import torch"),
    "import selftune.cli": python("import selftune.cli"),
    "selftune --help": [sys.executable, "-m", "selftune", "--help"],
    "import ray.train": python("import ray.train"),
    "import mlflow": python("import mlflow"),
}


def store_command(db: Path) -> list[str]:
    return python(
        "import time; from selftune.tracking import ensure_experiment; t = time.perf_counter(); "
        f"ensure_experiment('sqlite:///{db}', 'startup'); print(f'{{time.perf_counter() - t:.3f}}')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unlabelled", type=int, default=8, help="images the pseudo_label stage labels")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    sets = one_step_overrides(args.unlabelled)
    stages: list[dict[str, float]] = []

    with tempfile.TemporaryDirectory() as tmp:
        calls = iter(range(10**6))

        def selftune_run() -> tuple[float, float]:
            n = next(calls)
            wall, cpu, output = timed([sys.executable, "-m", "selftune", "run", str(PIPELINE), *sets,
                                       "--out", f"{tmp}/run-{n}", "--tracking-uri", f"sqlite:///{tmp}/mlflow-{n}.db",
                                       "--no-cache"], env)  # computed every call, as the bare script does
            stages.append(stage_seconds(output))
            return wall, cpu

        def bare() -> tuple[float, float]:
            wall, cpu, _ = timed([sys.executable, str(REPO / "benchmarks" / "_startup_bare.py"), f"{tmp}/bare-{next(calls)}",
                                  *sets], env)
            return wall, cpu

        arms = {"selftune run": selftune_run, "bare script": bare}
        for fn in arms.values():  # warm-up: the synthetic data, the page cache, MLflow's schema template
            fn()
        stages.clear()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
        for round_index in range(args.repeats):
            for name in arms if round_index % 2 == 0 else reversed(list(arms)):
                results[name].append(arms[name]())

        breakdown: dict[str, list[float]] = {name: [] for name in [*BREAKDOWN, "fresh MLflow store"]}
        for round_index in range(args.repeats):
            for name, command in BREAKDOWN.items():
                breakdown[name].append(timed(command, env)[0])
            _, _, seconds = timed(store_command(Path(tmp) / f"store-{round_index}.db"), env)
            breakdown["fresh MLflow store"].append(float(seconds))

    print(f"1-step quickstart ({args.unlabelled} images labelled), {args.repeats} alternating rounds, each a fresh process")
    print(f"{'arm':>14} {'min s':>7} {'median':>7} {'max':>7} {'CPU s':>7}")
    medians = {}
    for name, values in results.items():
        walls = [wall for wall, _ in values]
        medians[name] = statistics.median(walls)
        print(f"{name:>14} {min(walls):>7.2f} {medians[name]:>7.2f} {max(walls):>7.2f} "
              f"{statistics.median(cpu for _, cpu in values):>7.2f}")
    print(f"ratio of medians selftune / bare: {medians['selftune run'] / medians['bare script']:.2f} (goal <= 1.5)")
    print("breakdown (median wall s, fresh processes):")
    for name, values in breakdown.items():
        note = " (inside the process, after imports)" if name == "fresh MLflow store" else ""
        print(f"  {name:>22} {statistics.median(values):6.2f}{note}")
    for name in stages[0] if stages else []:
        print(f"  {'stage ' + name:>22} {statistics.median(s[name] for s in stages):6.2f} (selftune's stage table)")


if __name__ == "__main__":
    main()
