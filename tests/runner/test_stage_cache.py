"""The stage cache: keys follow a stage's effective inputs; concurrent claims compute once."""

from __future__ import annotations

import threading
import time

from selftune.config import load_pipeline
from selftune.runner import StageCache, stage_keys
from selftune.stages import SUMMARY
from support import REPO

QUICKSTART = REPO / "pipelines" / "quickstart.yaml"


def keys(*overrides: str) -> list[str]:
    """Every stage's key, each chained on its upstream stages' keys (as a trial computes them)."""
    return stage_keys(load_pipeline(QUICKSTART, overrides))


def test_equal_configs_share_keys_and_a_change_invalidates_only_what_follows_it():
    base = keys()
    assert keys() == base
    supervised, pseudo_label, self_train = base
    # A pseudo-label threshold changes the labelling and self-training, not the supervised stage.
    changed = keys("stages.pseudo_label.threshold=0.8")
    assert changed[0] == supervised and changed[1] != pseudo_label and changed[2] != self_train
    # A change to the last stage leaves the first two shared.
    changed = keys("stages.self_train.optimizer.lr=0.003")
    assert changed[:2] == [supervised, pseudo_label] and changed[2] != self_train
    # The dataset, the seed and the model reach every stage.
    for override in ("data.labelled=12", "seed=1", "model.options.width=16"):
        assert all(a != b for a, b in zip(keys(override), base)), override


def test_numerics_that_change_results_are_in_the_key_but_cpu_count_is_not():
    base = keys()
    assert keys("resources.workers=2")[0] != base[0]
    assert keys("resources.cpus_per_worker=2") == base


def test_a_miss_then_a_hit(tmp_path):
    cache = StageCache(tmp_path)
    with cache.claim(0, "supervised", "abc") as (entry, hit):
        assert not hit and entry.is_dir() and not any(entry.iterdir())
        (entry / SUMMARY).write_text("{}")
    with cache.claim(0, "supervised", "abc") as (entry, hit):
        assert hit
    with cache.claim(0, "supervised", "abd") as (_, hit):
        assert not hit


def test_a_failed_computation_leaves_no_entry_and_is_retried_from_a_clean_folder(tmp_path):
    cache = StageCache(tmp_path)
    try:
        with cache.claim(0, "s", "k") as (entry, hit):
            (entry / "half-written.png").write_text("x")
            raise RuntimeError("worker died")
    except RuntimeError:
        pass
    with cache.claim(0, "s", "k") as (entry, hit):
        assert not hit
        assert list(entry.iterdir()) == []  # the leftovers are gone


def test_concurrent_claims_wait_for_one_computation(tmp_path):
    cache = StageCache(tmp_path)
    computed, hits, start = [], [], threading.Barrier(4)

    def trial() -> None:
        start.wait()
        with cache.claim(0, "supervised", "same") as (entry, hit):
            if hit:
                hits.append(entry)
                return
            computed.append(entry)
            time.sleep(0.3)  # long enough that the other claimants arrive while this one computes
            (entry / SUMMARY).write_text("{}")

    threads = [threading.Thread(target=trial) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(computed) == 1 and len(hits) == 3
    assert set(hits) == set(computed)
