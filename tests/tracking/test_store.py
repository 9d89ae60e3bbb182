"""A fresh SQLite tracking store: several processes opening it at once all succeed (MLflow alone
races to create its schema), and the quick schema copy is exactly the schema MLflow creates."""

from __future__ import annotations

import multiprocessing
import sqlite3

import mlflow  # noqa: F401  (imported before the fork, as a driver has it)
from mlflow import MlflowClient

from selftune import tracking

PROCESSES = 8


def _open_and_create_a_run(uri: str, barrier, results) -> None:
    barrier.wait()  # all at once, on a file none of them has created yet
    try:
        experiment_id = tracking.ensure_experiment(uri, "race")
        run_id = tracking.create_run(uri, experiment_id, name="r", kind=tracking.KIND_PIPELINE)
        tracking.finish_run(uri, run_id, "FINISHED")
        results.put("ok")
    except Exception as error:  # noqa: BLE001  (reported to the test, which prints it)
        results.put(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")


def test_eight_processes_on_one_fresh_sqlite_file_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=_open_and_create_a_run, args=(uri, barrier, results)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok"] * PROCESSES
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert len(runs) == PROCESSES and {run.info.status for run in runs} == {"FINISHED"}


def _schema(path) -> tuple[list, list]:
    with sqlite3.connect(path) as db:
        objects = db.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        tables = sorted((kind, name, _clauses(sql)) for kind, name, sql in objects)
        revision = list(db.execute("SELECT version_num FROM alembic_version"))
    return tables, revision


def _clauses(sql: str | None) -> tuple[str, ...]:
    """A CREATE statement's clauses, sorted: alembic's batch migrations write a table's constraints
    in an order that varies between processes (set iteration), for MLflow's own creation too."""
    return tuple(sorted(line.strip().rstrip(",").strip() for line in (sql or "").splitlines()))


def test_the_copied_schema_is_the_one_mlflow_creates(tmp_path):
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    tracking.prepare_store(f"sqlite:///{ours}")
    MlflowClient(f"sqlite:///{theirs}").search_experiments()  # MLflow's own creation
    assert _schema(ours) == _schema(theirs)
    ours_default, theirs_default = (MlflowClient(f"sqlite:///{path}").get_experiment("0") for path in (ours, theirs))
    assert ours_default.name == theirs_default.name == "Default"  # opened, not copied: not the template's
    assert ours_default.artifact_location == theirs_default.artifact_location
