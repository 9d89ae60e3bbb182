"""Search efficiency, measured fairly: what TPE, ASHA and the stage cache each buy.

Three arms search the same space (the quickstart pipeline, every value continuous — the supervised
learning rate too, so no two trials share a stage by design) with the same budget of trials:

(a) TPE + ASHA + cache   sampler seed ``100 + seed``: its random start-up trials are not (b)'s
(b) random + ASHA + cache sampler seed ``seed``
(c) random, neither      sampler seed ``seed``: the same trials as (b), every one run to the end

(b) against (c) is ASHA and the cache alone on the same trials (and whether ASHA stopped the trial
that was (c)'s best); (a) against (b) is TPE's own contribution. Compute is the summed wall time
of the stage runs each arm computed (cache hits cost nothing). Per arm and seed it prints the best
selection mIoU, that trial's val mIoU, the compute to reach (c)'s final best (``-``: never), the
best at equal compute (the least total compute of the three arms on that seed) and the totals;
then medians over seeds. Arms alternate their order from seed to seed (abc, cba, …).

    python benchmarks/search_efficiency.py [--seeds 0 1 2] [--samples 8] [--steps 25]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from _measure import measured_search

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "a": ("(a) TPE + ASHA + cache", {"searcher": {"name": "tpe", "n_startup_trials": 4},
                                     "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "stage_cache": True}),
    "b": ("(b) random + ASHA + cache", {"searcher": {"name": "random"},
                                        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "stage_cache": True}),
    "c": ("(c) random, neither", {"searcher": {"name": "random"}, "scheduler": {"name": "none"}, "stage_cache": False}),
}
PARAMS = {  # all continuous: a shared stage happens only if the sampler repeats itself
    "stages.supervised.optimizer.lr": {"type": "float", "low": 1.0e-3, "high": 8.0e-3, "log": True},
    "stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.99},
    "stages.self_train.optimizer.lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
    "stages.self_train.pseudo_weight": {"type": "float", "low": 0.25, "high": 2.0},
}


def space_file(folder: Path, arm: str, seed: int, samples: int, steps: int) -> Path:
    settings = ARMS[arm][1]
    searcher = {**settings["searcher"], "seed": seed + 100 if settings["searcher"]["name"] == "tpe" else seed}
    path = folder / f"{arm}_{seed}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"{arm}_{seed}", "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {"data.selection": 20, "stages.supervised.epochs": 4, "stages.supervised.steps_per_epoch": steps,
                "stages.self_train.epochs": 2, "stages.self_train.steps_per_epoch": steps},
        "objective": {"metric": "select/miou", "mode": "max"}, "params": PARAMS,
        "searcher": searcher, "scheduler": settings["scheduler"], "stage_cache": settings["stage_cache"],
        "budget": {"num_samples": samples, "max_concurrent": 2},
    }))
    return path


def compute_to_reach(trials: list[dict], target: float) -> float:
    """Compute spent when the first trial with a selection mIoU >= ``target`` finished (inf: none did)."""
    reached = [t["compute_when_known"] for t in trials if t["select"] >= target - 1e-12]
    return min(reached, default=math.inf)


def best_within(trials: list[dict], compute: float) -> float:
    known = [t["select"] for t in trials if t["compute_when_known"] <= compute + 1e-9]
    return max(known, default=float("nan"))


def same_trial(a: dict, b: dict) -> bool:
    return all(math.isclose(float(a[key]), float(b[key]), rel_tol=1e-9) for key in PARAMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="training steps per epoch (4 supervised epochs, 2 self-training)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    started = time.perf_counter()
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for position, seed in enumerate(args.seeds):
            folder = Path(tmp) / f"seed{seed}"
            folder.mkdir()
            for arm in "abc" if position % 2 == 0 else "cba":
                rows[arm, seed] = measured_search(space_file(folder, arm, seed, args.samples, args.steps), folder, f"{arm}_{seed}")
            print_seed(rows, seed)
    print_medians(rows, args.seeds)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {args.samples} trials per arm, {args.steps} steps per epoch")


def seed_summary(rows: dict, seed: int) -> dict[str, dict]:
    target = rows["c", seed]["best_select"]
    equal = min(rows[arm, seed]["compute_s"] for arm in ARMS)
    best_c = max(rows["c", seed]["trials"], key=lambda t: t["select"], default=None)
    summary = {}
    for arm in ARMS:
        r = rows[arm, seed]
        summary[arm] = {**r, "to_reach_c": compute_to_reach(r["trials"], target), "best_at_equal": best_within(r["trials"], equal),
                        "equal_compute": equal}
    if best_c is not None:  # same trials as (c): did ASHA stop (c)'s best one?
        twin = [t for t in rows["b", seed]["all_trials"] if same_trial(t["params"], best_c["params"])]
        summary["b"]["stopped_c_best"] = bool(twin) and twin[0]["stopped_early"]
    return summary


def print_seed(rows: dict, seed: int) -> None:
    summary = seed_summary(rows, seed)
    print(f"\nseed {seed}: (c)'s best select/miou {rows['c', seed]['best_select']:.4f}; equal compute "
          f"{summary['a']['equal_compute']:.0f} s")
    print(f"{'arm':28}{'best select':>12}{'its val':>9}{'to reach (c) s':>16}{'best @ equal':>14}"
          f"{'stage runs':>12}{'compute s':>11}{'wall s':>9}{'stopped':>9}")
    for arm, (label, _) in ARMS.items():
        s = summary[arm]
        reach = "-" if math.isinf(s["to_reach_c"]) else f"{s['to_reach_c']:.0f}"
        print(f"{label:28}{s['best_select']:>12.4f}{s['best_val']:>9.4f}{reach:>16}{s['best_at_equal']:>14.4f}"
              f"{s['executions']:>12}{s['compute_s']:>11.0f}{s['wall_s']:>9.0f}{s['stopped']:>9}")
    if "stopped_c_best" in summary["b"]:
        print(f"ASHA stopped (c)'s best trial in (b): {'yes' if summary['b']['stopped_c_best'] else 'no'}")


def print_medians(rows: dict, seeds: list[int]) -> None:
    summaries = [seed_summary(rows, seed) for seed in seeds]
    print("\nmedians over seeds (min..max):")
    for key in ("best_select", "best_val", "best_at_equal", "compute_s", "to_reach_c"):
        cells = []
        for arm in ARMS:
            values = [s[arm][key] for s in summaries]
            cells.append(f"{arm} {statistics.median(values):.4g} ({min(values):.4g}..{max(values):.4g})")
        print(f"  {key:14}" + "   ".join(cells))
    for a, b in (("a", "b"), ("b", "c"), ("a", "c")):
        ratios = [s[a]["compute_s"] / s[b]["compute_s"] for s in summaries]
        print(f"  compute {a}/{b}: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    lost = [s["b"].get("stopped_c_best") for s in summaries]
    print(f"  ASHA stopped (c)'s best trial in (b) on {sum(bool(x) for x in lost)} of {len(lost)} seeds")


if __name__ == "__main__":
    main()
