"""benchmarks/search_efficiency.py's arithmetic: compute to reach a value, the best at equal
compute, and arms that share no first trials except (b) and (c), which must share all of them."""

from __future__ import annotations

import importlib.util
import math
import sys

import yaml

from selftune.search.space import load_search_space
from support import REPO


def _load_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling _measure
    spec = importlib.util.spec_from_file_location("search_efficiency", REPO / "benchmarks" / "search_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
TRIALS = [{"select": 0.70, "compute_when_known": 40.0}, {"select": 0.74, "compute_when_known": 90.0},
          {"select": 0.72, "compute_when_known": 60.0}]


def test_compute_to_reach_is_when_the_first_trial_at_least_that_good_finished():
    assert bench.compute_to_reach(TRIALS, 0.72) == 60.0
    assert bench.compute_to_reach(TRIALS, 0.74) == 90.0
    assert math.isinf(bench.compute_to_reach(TRIALS, 0.75))


def test_best_at_equal_compute_counts_only_trials_known_by_then():
    assert bench.best_within(TRIALS, 59.0) == 0.70
    assert bench.best_within(TRIALS, 60.0) == 0.72
    assert math.isnan(bench.best_within(TRIALS, 10.0))


def test_the_arms_seeds_and_spaces(tmp_path):
    spaces = {arm: yaml.safe_load(bench.space_file(tmp_path, arm, 3, 8, 5).read_text()) for arm in bench.ARMS}
    assert spaces["a"]["searcher"] == {"name": "tpe", "n_startup_trials": 4, "seed": 103}  # not (b)'s first trials
    assert spaces["b"]["searcher"] == spaces["c"]["searcher"] == {"name": "random", "seed": 3}  # the same trials
    assert (spaces["c"]["scheduler"], spaces["c"]["stage_cache"]) == ({"name": "none"}, False)
    assert all(p["type"] == "float" for p in spaces["a"]["params"].values())  # no cache win by design
    for arm in bench.ARMS:
        load_search_space(tmp_path / f"{arm}_3.yaml")  # each is a valid space
