"""Curriculum search: PBT over DST-CBC's rounds vs TPE + ASHA at the same budget, in one run.

Both arms search the same knobs over the same ranges on the same (shortened) pipeline, seeds and
selection split, with the stage cache on:
  (pbt)  search_spaces/dst_cbc_pbt.yaml: alpha, gamma and T per round, a population of 4;
  (tpe)  TPE + ASHA over alpha as a linear schedule (start, end) and gamma, T as constants.
Neither starts from the paper's values (no points_to_evaluate), so no trial is shared.

The budget: PBT runs first and its wall time becomes TPE's ``budget.time_limit_s`` (TPE gets as
many trials as fit). Prints, per arm and seed, the best trial's select/miou (what both
optimised), its val/miou (reported images), stage runs (cache misses), compute seconds (summed
stage wall times) and wall seconds, then the PBT/TPE ratios of their medians.

    python benchmarks/curriculum_search.py [--seeds 0 1] [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from _measure import measured_search

REPO = Path(__file__).resolve().parent.parent


def shortened(rounds: int, steps: int) -> dict:
    """The CPU budget: fewer rounds and steps than the pipeline's, the same for both arms."""
    return {"data.selection": 20, "stages.dst.rounds": rounds, "stages.dst.stages.train.epochs": 1,
            "stages.dst.stages.train.steps_per_epoch": steps}


def tpe_space(folder: Path, sets: dict, seed: int) -> Path:
    path = folder / "tpe.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"tpe_{seed}", "pipeline": str(REPO / "pipelines" / "dst_cbc.yaml"), "set": sets,
        "objective": {"metric": "select/miou", "mode": "max"},
        "params": {
            "stages.dst.schedules.label.alpha.start": {"type": "float", "low": 0.2, "high": 1.0},
            "stages.dst.schedules.label.alpha.end": {"type": "float", "low": 0.2, "high": 1.0},
            "stages.dst.stages.train.gamma": {"type": "float", "low": 0.0, "high": 12.0},
            "stages.dst.stages.label.T": {"type": "float", "low": 0.0, "high": 0.9},
        },
        "searcher": {"name": "tpe", "seed": seed, "n_startup_trials": 4},
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "budget": {"num_samples": 64, "max_concurrent": 2},
    }))
    return path


def measure(space_path: Path | str, overrides: list[str], folder: Path, name: str) -> dict:
    r = measured_search(space_path, folder, name, overrides)
    return {"select": r["best_select"], "val": r["best_val"], "executions": r["executions"], "compute_s": r["compute_s"],
            "wall_s": r["wall_s"], "trials": len(r["all_trials"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    sets = shortened(args.rounds, args.steps)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed{seed}"
            folder.mkdir()
            common = [f"{key}={value}" for key, value in sets.items()] + [f"seed={seed}"]
            pbt = measure(REPO / "search_spaces" / "dst_cbc_pbt.yaml",
                          [*common, f"searcher.seed={seed}", f"scheduler.seed={seed}"], folder, f"pbt_{seed}")
            tpe = measure(tpe_space(folder, sets, seed), [f"seed={seed}", f"budget.time_limit_s={pbt['wall_s']:.0f}"],
                          folder, f"tpe_{seed}")
            rows += [("pbt", seed, pbt), ("tpe+asha", seed, tpe)]
            print_table(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; rounds {args.rounds}, {args.steps} training steps per round")
    for key in ("select", "val", "executions", "compute_s", "wall_s"):
        pbt = statistics.median(r[key] for arm, _, r in rows if arm == "pbt")
        tpe = statistics.median(r[key] for arm, _, r in rows if arm == "tpe+asha")
        print(f"median {key}: pbt {pbt:.4g}, tpe+asha {tpe:.4g}, ratio pbt/tpe {pbt / tpe:.3f}")


def print_table(rows) -> None:
    print(f"\n{'arm':10}{'seed':>5}{'best select':>13}{'its val':>9}{'trials':>8}{'stage runs':>12}{'compute s':>11}{'wall s':>9}")
    for arm, seed, r in rows:
        print(f"{arm:10}{seed:>5}{r['select']:>13.4f}{r['val']:>9.4f}{r['trials']:>8}{r['executions']:>12}{r['compute_s']:>11.1f}{r['wall_s']:>9.1f}")


if __name__ == "__main__":
    main()
