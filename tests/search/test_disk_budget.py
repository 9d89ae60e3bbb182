"""A search's disk budget on a real store: entries claimed through ``StageCache`` as trials claim
them, real ``.use`` locks for running trials, real pins; Tune's calls to the callback driven by
hand (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from selftune.errors import ConfigError
from selftune.runner import StageCache
from selftune.runner.store import human_size, stored_stages
from selftune.search.disk_budget import DiskBudget, enforce, search_owner
from selftune.search.space import load_search_space
from support import REPO

MIB = 2**20


def compute(store: StageCache, name: str, key: str, mib: int) -> None:
    """One stage computed into the store: ``mib`` MiB of outputs, then its summary (complete)."""
    with store.claim(0, name, key) as (folder, hit):
        assert not hit
        (folder / "checkpoint.pt").write_bytes(os.urandom(mib * MIB))
        (folder / "summary.json").write_text("{}")


def keys_left(root: Path) -> set[str]:
    return {stored.key for stored in stored_stages(root)}


@pytest.fixture
def search_store(tmp_path):
    root, owner = tmp_path / "stages", search_owner(tmp_path / "search")
    return root, owner


def test_the_oldest_of_the_searchs_own_entries_go_first_until_it_fits(search_store):
    root, owner = search_store
    mine = StageCache(root, owner=owner)
    for index, key in enumerate(["a" * 16, "b" * 16, "c" * 16]):
        compute(mine, f"stage{index}", key, mib=2)
    mine.release()
    compute(StageCache(root, owner="run elsewhere"), "other", "d" * 16, mib=2)  # another user's: not this budget's
    report = enforce(root, owner, max_bytes=int(4.5 * MIB), keep=set())
    assert [stored.key for stored in report.deleted] == ["a" * 16]  # 6 MiB of its own -> 4 MiB
    assert keys_left(root) == {"b" * 16, "c" * 16, "d" * 16}
    assert report.size_after <= 4.5 * MIB


def test_running_trials_entries_the_best_trials_and_pinned_ones_are_kept(search_store):
    root, owner = search_store
    running = StageCache(root, owner=owner)
    compute(running, "supervised", "a" * 16, mib=2)  # still held: this "trial" has not released it
    ended = StageCache(root, owner=owner)
    for key in ("b" * 16, "c" * 16, "e" * 16):
        compute(ended, "self_train", key, mib=2)
    ended.release()
    ended.pin("self_train", "c" * 16, {"model": "registered"})
    report = enforce(root, owner, max_bytes=0, keep={"e" * 16})
    assert [stored.key for stored in report.deleted] == ["b" * 16]
    assert [stored.key for stored in report.held] == ["a" * 16]
    assert keys_left(root) == {"a" * 16, "c" * 16, "e" * 16}
    running.release()
    assert "a" * 16 in {s.key for s in enforce(root, owner, max_bytes=0, keep={"e" * 16}).deleted}  # free once it ended


def test_the_callback_protects_the_best_finished_trial_and_says_what_it_deleted(search_store):
    root, owner = search_store
    store = StageCache(root, owner=owner)
    compute(store, "supervised", "a" * 16, mib=1)  # trial t1's: the better one
    compute(store, "supervised", "b" * 16, mib=1)  # trial t2's
    store.release()
    lines = []
    budget = DiskBudget(root, owner, int(1.5 * MIB), "max", keys=lambda config: {config["key"]}, say=lines.append)
    done = {"stage": 3, "stages_total": 3}
    budget.on_trial_complete(0, [], SimpleNamespace(config={"key": "a" * 16}, last_result={**done, "objective": 0.8}))
    budget.on_trial_complete(0, [], SimpleNamespace(config={"key": "b" * 16}, last_result={**done, "objective": 0.7}))
    assert keys_left(root) == {"a" * 16}
    assert lines == [f"  disk budget: deleted 1 stage output(s) of ended trials; the search's stages now take "
                     f"{human_size(MIB)} of {human_size(1.5 * MIB)}"]


def write_space(tmp_path: Path, **budget) -> Path:
    spec = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    spec["pipeline"] = str(REPO / "pipelines" / "quickstart.yaml")
    spec["budget"].update(budget)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_budget_is_a_size_and_a_bad_one_names_the_key(tmp_path):
    assert load_search_space(write_space(tmp_path, disk="20G")).config.budget.disk_bytes == 20 * 2**30
    with pytest.raises(ConfigError, match=r"budget\.disk.*e\.g\. 50G"):
        load_search_space(write_space(tmp_path, disk="a lot"))


def test_population_searches_refuse_a_budget(tmp_path):
    spec = yaml.safe_load((REPO / "search_spaces" / "dst_cbc_pbt.yaml").read_text())
    spec["pipeline"] = str(REPO / "pipelines" / "dst_cbc.yaml")
    spec.setdefault("budget", {})["disk"] = "1G"
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"budget\.disk: not with scheduler pbt"):
        load_search_space(path)


@pytest.mark.slow
def test_a_search_with_a_tiny_budget_keeps_only_its_best_trials_stages(tmp_path, small_synthetic):
    """A real search (3 trials, two at a time) with a budget smaller than one trial's stages: every
    trial still finishes, and at the end the store holds the search's best trial's stages and
    nothing else the search computed."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "budget", "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        # enough steps that the trials' values differ (tied trials would all be kept as the best)
        "set": {"data.root": str(small_synthetic), "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 12,
                "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 3, "stages.pseudo_label.threshold": 0.5},
        "params": {"stages.supervised.optimizer.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
        "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "budget": {"num_samples": 3, "max_concurrent": 2, "disk": "1K"},
    }))
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "stages"
    search = subprocess.run([sys.executable, "-m", "selftune", "search", str(space), "--out", str(tmp_path / "runs"),
                             "--store", str(store), "--tracking-uri", uri],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    assert "disk budget: deleted" in search.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("budget").experiment_id
    trials = client.search_runs([experiment], filter_string="tags.`selftune.kind` = 'trial'")
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    best = max(t.data.metrics["objective"] for t in trials)  # ties (tiny trials) keep every tied trial's
    kept = set()
    for trial in (t for t in trials if t.data.metrics["objective"] == best):
        kept |= {run.data.tags["selftune.cache_key"] for run in client.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")}
    assert keys_left(store) == kept and len(kept) >= 3
