"""The stage store that runs, searches and finals share: where it is, reuse across runs, the code
and data fingerprints in the keys, --no-cache, pruning, and waiting across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from selftune.cli import main
from selftune.config import load_pipeline
from selftune.runner import StageCache, default_store_root, run_pipeline, stage_keys
from selftune.runner import fingerprints
from selftune.runner.store import parse_age, parse_size, prune, stored_stages
from selftune.stages import RESULT, SUMMARY
from support import REPO

QUICKSTART = REPO / "pipelines" / "quickstart.yaml"
TINY = ["stages.pseudo_label.threshold=0.5", "data.selection=4"]


@pytest.fixture
def dataset(tmp_path, small_synthetic) -> Path:
    """A copy of the small synthetic dataset, so a test may touch its files."""
    return Path(shutil.copytree(small_synthetic, tmp_path / "data"))


def tiny_pipeline(dataset: Path, *overrides: str):
    return load_pipeline(QUICKSTART, [f"data.dataset=folder", f"data.root={dataset}", *TINY, *overrides])


@pytest.fixture
def executed(monkeypatch) -> list[str]:
    """The stages a run computes: ``run_pipeline``'s executor replaced by one that only writes a summary."""
    names: list[str] = []

    def fake_in_process(resources, *, storage):
        def execute(job) -> None:
            names.append(job.stage.name)
            job.write_json(RESULT, {"val/miou": 0.5, "select/miou": 0.4})
        return execute

    monkeypatch.setattr("selftune.runner.pipeline.in_process", fake_in_process)
    return names


def stage_runs(uri: str, run_id: str) -> dict[str, object]:
    from mlflow import MlflowClient

    mlflow = MlflowClient(uri)
    experiment = mlflow.get_run(run_id).info.experiment_id
    runs = mlflow.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {run.data.tags["selftune.stage"]: run for run in runs}


def test_the_store_is_selftune_stage_store_else_under_selftune_storage_else_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SELFTUNE_STAGE_STORE")
    monkeypatch.delenv("SELFTUNE_STORAGE", raising=False)
    assert default_store_root() == tmp_path / "runs" / "stages"
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    head = compose["services"]["ray-head"]
    monkeypatch.setenv("SELFTUNE_STORAGE", head["environment"]["SELFTUNE_STORAGE"])  # on the shared volume
    shared = next(mount.split(":")[1] for mount in head["volumes"] if mount.startswith("shared:"))
    assert default_store_root() == Path(head["environment"]["SELFTUNE_STORAGE"]) / "stages"
    assert default_store_root().is_relative_to(shared)
    monkeypatch.setenv("SELFTUNE_STAGE_STORE", str(tmp_path / "elsewhere"))
    assert default_store_root() == tmp_path / "elsewhere"
    assert default_store_root("given") == tmp_path / "given"


def test_a_second_run_reuses_the_stored_stages_and_records_hits(dataset, executed, tmp_path, tracking_uri):
    pipeline = tiny_pipeline(dataset)
    first = run_pipeline(pipeline, out=tmp_path / "one", tracking_uri=tracking_uri)
    assert executed == ["supervised", "pseudo_label", "self_train"]
    second = run_pipeline(pipeline, out=tmp_path / "two", tracking_uri=tracking_uri)
    assert executed == ["supervised", "pseudo_label", "self_train"]  # nothing computed again
    assert [s.hit for s in first.stages] == [False] * 3 and [s.hit for s in second.stages] == [True] * 3
    runs = stage_runs(tracking_uri, second.run_id)
    assert {name: run.data.tags["selftune.cache"] for name, run in runs.items()} == dict.fromkeys(runs, "hit")
    assert all(run.info.status == "FINISHED" and run.data.metrics["val/miou"] == 0.5 for run in runs.values())
    store = Path(os.environ["SELFTUNE_STAGE_STORE"])
    for result in (first, second):  # each run's folder is complete: its stages link to the store's entries
        link = Path(result.output_dir) / "0-supervised"
        assert link.is_symlink() and link.resolve() == store / f"supervised-{result.stages[0].key}"
        assert (link / SUMMARY).is_file()
    (entry,) = [s for s in stored_stages(store) if s.stage == "supervised"]
    assert [user["run"] for user in entry.users] == [first.run_id, second.run_id]


def test_no_cache_recomputes_into_the_runs_own_folders_and_leaves_the_store_alone(dataset, executed, tmp_path, tracking_uri):
    pipeline = tiny_pipeline(dataset)
    run_pipeline(pipeline, out=tmp_path / "one", tracking_uri=tracking_uri)
    store = Path(os.environ["SELFTUNE_STAGE_STORE"])
    before = {s.entry.folder.name: s.record for s in stored_stages(store)}
    again = run_pipeline(pipeline, out=tmp_path / "two", tracking_uri=tracking_uri, use_store=False)
    assert executed == ["supervised", "pseudo_label", "self_train"] * 2
    assert again.store is None and not any(s.hit for s in again.stages)
    folder = Path(again.output_dir) / "0-supervised"
    assert folder.is_dir() and not folder.is_symlink() and (folder / SUMMARY).is_file()
    assert {s.entry.folder.name: s.record for s in stored_stages(store)} == before


def edited(monkeypatch, relative: str) -> None:
    """Pretend one line was added to a selftune source file."""
    original = fingerprints.read_source
    target = fingerprints.PACKAGE / relative
    monkeypatch.setattr(fingerprints, "read_source", lambda path: original(path) + (b"\n# edited\n" if path == target else b""))
    fingerprints.forget_code_fingerprints()


def test_a_changed_line_of_source_changes_the_stages_that_run_it_and_those_downstream(dataset, monkeypatch):
    pipeline = tiny_pipeline(dataset)
    supervised, pseudo_label, self_train = base = stage_keys(pipeline)
    try:
        edited(monkeypatch, "stages/self_train.py")  # only the self-training kind runs it
        assert stage_keys(pipeline)[:2] == [supervised, pseudo_label] and stage_keys(pipeline)[2] != self_train
        monkeypatch.undo()
        edited(monkeypatch, "methods/st_plus_plus.py")  # a method this pipeline does not run
        assert stage_keys(pipeline) == base
        monkeypatch.undo()
        edited(monkeypatch, "stages/supervised.py")  # the first stage: every stage downstream too
        assert all(a != b for a, b in zip(stage_keys(pipeline), base))
        monkeypatch.undo()
        edited(monkeypatch, "engine/loop.py")  # shared training code
        assert all(a != b for a, b in zip(stage_keys(pipeline), base))
        monkeypatch.undo()
        monkeypatch.setattr("selftune.__version__", "9.9.9")
        fingerprints.forget_code_fingerprints()
        assert all(a != b for a, b in zip(stage_keys(pipeline), base))
    finally:
        monkeypatch.undo()
        fingerprints.forget_code_fingerprints()
    assert stage_keys(pipeline) == base


def test_a_touched_mask_or_split_file_changes_the_keys_and_the_next_run_recomputes(dataset, executed, tmp_path, tracking_uri):
    pipeline = tiny_pipeline(dataset)
    base = stage_keys(pipeline)
    run_pipeline(pipeline, out=tmp_path / "one", tracking_uri=tracking_uri)
    mask = sorted((dataset / "masks").iterdir())[0]
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-labelled: a newer mtime, same size
    touched = stage_keys(pipeline)
    assert all(a != b for a, b in zip(touched, base))  # every stage reads the data
    run_pipeline(pipeline, out=tmp_path / "two", tracking_uri=tracking_uri)
    assert executed == ["supervised", "pseudo_label", "self_train"] * 2
    assert stage_keys(pipeline) == touched  # stat only: the same files give the same keys
    val_list = dataset / "splits" / "val.txt"
    val_list.write_text("\n".join(val_list.read_text().split()[:-1]) + "\n")  # one val image fewer
    assert all(a != b for a, b in zip(stage_keys(pipeline), touched))


def stored(cache: StageCache, name: str, key: str, size: int, last_used: float) -> None:
    """An entry of ``size`` + 2 bytes (its ``summary.json``) last used at ``last_used``."""
    with cache.claim(0, name, key) as (folder, _):
        (folder / "weights.bin").write_bytes(b"x" * size)
        (folder / SUMMARY).write_text("{}")
    entry = cache.entry(name, key)
    record = entry.read_record()
    entry.write_record({**record, "last_used": last_used})


def test_prune_by_age_then_to_a_size_keeps_pinned_and_held_entries(tmp_path):
    store = tmp_path / "store"
    cache = StageCache(store)
    day = 86400.0
    now = 100 * day
    for key, days_ago in (("a", 40), ("b", 35), ("c", 20), ("d", 10), ("e", 1)):
        stored(cache, "supervised", key * 16, 1000, now - days_ago * day)
    cache.release()
    cache.pin("supervised", "b" * 16, {"model": "selftune-quickstart", "version": "1", "run": "r"})
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.json").write_text("{}")
    cache.pin("supervised", "c" * 16, {"search": str(search), "trial": "t1"})
    running = StageCache(store)  # a run that still holds entry d
    with running.claim(0, "supervised", "d" * 16) as (_, hit):
        assert hit
    leftover = store / f"self_train-{'f' * 16}"  # a failed computation's folder: no summary
    leftover.mkdir()

    report = prune(store, older_than_s=30 * day, now=now)
    assert sorted(s.key[0] for s in report.deleted) == ["a", "f"]  # b is older but a model needs it
    report = prune(store, max_size=1500, now=now)
    assert [s.key[0] for s in report.held] == ["d"] and [s.key[0] for s in report.deleted] == ["e"]
    left = stored_stages(store)
    assert sorted(s.key[0] for s in left) == ["b", "c", "d"] and report.size_after == sum(s.size for s in left) == 3 * 1002
    assert not (store / f"supervised-{'a' * 16}.lock").exists()  # no litter left by a deletion
    running.release()
    shutil.rmtree(search)  # the pin of a deleted search's best trial lapses
    assert [s.key[0] for s in prune(store, max_size=1500, now=now).deleted] == ["c", "d"]
    assert [s.key[0] for s in stored_stages(store)] == ["b"]


def test_store_list_shows_size_users_and_what_needs_an_entry(tmp_path, capsys):
    cache = StageCache(tmp_path, owner="run /runs/quickstart-1")
    stored(cache, "supervised", "a" * 16, 2048, time.time() - 7200)
    cache.release()
    cache.pin("supervised", "a" * 16, {"model": "selftune-quickstart", "version": "3", "run": "r"})
    assert main(["store", "list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "supervised" in out and "a" * 16 in out and "2.0K" in out and "2h ago" in out
    assert "1: run /runs/quickstart-1" in out and "model selftune-quickstart v3" in out


@pytest.mark.parametrize("args, message", [
    (["--max-size", "50X"], "--max-size 50X: not a size"),
    (["--older-than", "soon"], "--older-than soon: not an age"),
    ([], "give --older-than AGE"),
])
def test_a_bad_prune_value_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["store", "prune", "--store", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_sizes_and_ages_parse():
    assert parse_size("50G") == 50 * 2**30 and parse_size("500M") == 500 * 2**20 and parse_size("1.5k") == 1536
    assert parse_size("2048") == 2048 and parse_size("10GiB") == 10 * 2**30
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("2w") == 14 * 86400


def claim_in_another_process(root: str, log: str) -> None:
    """One claimant: computes the entry (slowly) on a miss, else records the hit."""
    cache = StageCache(root)
    with cache.claim(0, "supervised", "0" * 16) as (folder, hit):
        with open(log, "a") as out:
            out.write(f"{'hit' if hit else 'miss'} {time.monotonic()}\n")
        if not hit:
            time.sleep(1.0)  # the other process arrives while this one computes
            (folder / SUMMARY).write_text(json.dumps({"pid": os.getpid()}))


def test_two_processes_wait_for_one_computation(tmp_path):
    log = tmp_path / "claims.txt"
    fork = multiprocessing.get_context("fork")  # the child only runs the lock code; no torch threads yet
    processes = [fork.Process(target=claim_in_another_process, args=(str(tmp_path / "store"), str(log))) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    (miss, miss_at), (hit, hit_at) = [line.split() for line in log.read_text().splitlines()]
    assert (miss, hit) == ("miss", "hit")
    assert float(hit_at) - float(miss_at) >= 0.9  # the second waited for the first's computation
