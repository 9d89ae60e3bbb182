"""`selftune search` for real: Ray Tune + Optuna + ASHA + the stage cache on the synthetic data,
then `selftune show` and `selftune final` on its results.

One search serves every test here (a module fixture): a few minutes of Ray are worth sharing.
Interrupts and ``--resume`` have their own test, which sends every signal to one search
(``test_search_interrupt_chain.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from support import REPO

pytestmark = pytest.mark.slow

NAN_LR = 1.0e30  # Adam with this learning rate turns the loss into NaN within a step
TINY = {
    "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 4,
    "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 4,
    "stages.pseudo_label.threshold": 0.5,
}


def cli(*args: str, cwd: Path, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selftune", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


@pytest.fixture(scope="module")
def search(tmp_path_factory, session_home, small_synthetic):
    folder = tmp_path_factory.mktemp("search")
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "e2e",
        "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {**TINY, "data.root": str(small_synthetic), "final": {"set": {"stages.self_train.epochs": 2}}},
        "params": {
            "stages.supervised.optimizer.lr": {"type": "categorical", "choices": [0.002, 0.004]},
            "stages.pseudo_label.threshold": {"type": "float", "low": 0.3, "high": 0.6},
            "stages.self_train.optimizer.lr": {"type": "categorical", "choices": [0.002, NAN_LR]},
        },
        "searcher": {"name": "tpe", "seed": 0, "n_startup_trials": 2, "points_to_evaluate": [
            {"stages.supervised.optimizer.lr": 0.002, "stages.pseudo_label.threshold": 0.5, "stages.self_train.optimizer.lr": NAN_LR},
            {"stages.supervised.optimizer.lr": 0.002, "stages.pseudo_label.threshold": 0.4, "stages.self_train.optimizer.lr": 0.002},
        ]},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"num_samples": 4, "max_concurrent": 2},
    }))
    env = {**os.environ, "HOME": str(session_home), "OMP_NUM_THREADS": "1",
           "SELFTUNE_CACHE": str(session_home / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    done = cli("search", str(space), cwd=folder, env=env)
    output = done.communicate(timeout=600)[0]
    return {"folder": folder, "env": env, "uri": env["MLFLOW_TRACKING_URI"], "code": done.returncode, "output": output}


def runs(uri: str, kind: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`selftune.kind` = '{kind}'", max_results=1000)


def test_the_search_finishes_with_every_trial_once_in_tune_optuna_and_mlflow(search):
    assert search["code"] == 0, search["output"][-3000:]
    (search_run,) = runs(search["uri"], "search")
    assert search_run.info.status == "FINISHED"
    trials = runs(search["uri"], "trial")
    trial_ids = [run.data.tags["selftune.trial_id"] for run in trials]
    assert len(trial_ids) == 4 and len(set(trial_ids)) == 4
    study_db = next(search["folder"].glob("runs/search-e2e-*/optuna.db"))
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{study_db}")
    assert len(study.trials) == 4
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    client = MlflowClient(search["uri"])
    experiment = client.get_experiment_by_name("e2e").experiment_id
    assert not client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")


def test_the_three_level_tree(search):
    (search_run,) = runs(search["uri"], "search")
    trials = runs(search["uri"], "trial")
    stages = runs(search["uri"], "stage")
    trial_ids = {run.info.run_id for run in trials}
    assert all(run.data.tags["mlflow.parentRunId"] == search_run.info.run_id for run in trials)
    assert stages and all(run.data.tags["mlflow.parentRunId"] in trial_ids for run in stages)
    for trial in trials:
        # params are exactly the sampled values, by their dotted names: what the UI compares
        assert set(trial.data.params) == {"stages.supervised.optimizer.lr", "stages.pseudo_label.threshold", "stages.self_train.optimizer.lr"}
    finished = [t for t in trials if t.info.status == "FINISHED" and "selftune.stopped_early" not in t.data.tags]
    assert finished and all("val/miou" in t.data.metrics and "objective" in t.data.metrics for t in finished)
    assert all(run.data.tags["selftune.cache"] in ("hit", "miss") for run in stages)
    artifacts = {a.path for a in MlflowClient(search["uri"]).list_artifacts(search_run.info.run_id)}
    assert {"results.csv", "search.png", "space.yaml", "best_params.yaml"} <= artifacts
    assert "selftune.best_trial_run_id" in search_run.data.tags


def test_the_stage_cache_computed_each_distinct_stage_once(search):
    stages = runs(search["uri"], "stage")
    misses = [run.data.tags["selftune.cache_key"] for run in stages if run.data.tags["selftune.cache"] == "miss"
              and run.info.status == "FINISHED"]
    assert len(misses) == len(set(misses))  # no finished stage was computed twice
    hits = [run for run in stages if run.data.tags["selftune.cache"] == "hit"]
    assert hits  # four trials over two supervised learning rates must share a supervised stage
    assert all("val/miou" in run.data.metrics or "pseudo_label/kept_fraction" in run.data.metrics for run in hits)


def test_a_diverging_trial_fails_with_its_reason_and_the_search_goes_on(search):
    trials = runs(search["uri"], "trial")
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert len(failed) >= 1
    assert all(float(t.data.params["stages.self_train.optimizer.lr"]) == NAN_LR for t in failed)
    assert all("training diverged" in t.data.tags["selftune.error"] for t in failed)
    assert any(t.info.status == "FINISHED" for t in trials)
    # Tune restarts failed trials (budget.trial_retries), but a trial's own error is not run again.
    for trial in failed:
        diverged = [run for run in runs(search["uri"], "stage") if run.data.tags.get("mlflow.parentRunId") == trial.info.run_id
                    and run.data.tags["selftune.stage"] == "self_train"]
        assert [run.info.status for run in diverged] == ["FAILED"]
    assert "restarting after" not in search["output"]


def test_summary_table_and_show(search):
    output = search["output"]
    assert "cache hits" in output and "objective" in output and "best trial" in output
    assert "selftune final --from" in output
    show = subprocess.run([sys.executable, "-m", "selftune", "show", "e2e"], cwd=search["folder"], env=search["env"],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    for trial in runs(search["uri"], "trial"):
        assert trial.data.tags["selftune.trial_id"] in show.stdout


def test_final_runs_the_best_values_with_the_final_section(search):
    process = cli("final", "--from", "e2e", cwd=search["folder"], env=search["env"])
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    (final,) = runs(search["uri"], "final")
    (search_run,) = runs(search["uri"], "search")
    best_trial = MlflowClient(search["uri"]).get_run(search_run.data.tags["selftune.best_trial_run_id"])
    assert final.data.tags["selftune.source_trial_run"] == best_trial.info.run_id
    assert final.info.status == "FINISHED"
    # the best trial's sampled values, and the pipeline's final: section on top
    assert float(final.data.params["stages.self_train.optimizer.lr"]) == float(best_trial.data.params["stages.self_train.optimizer.lr"])
    assert float(final.data.params["stages.pseudo_label.threshold"]) == pytest.approx(float(best_trial.data.params["stages.pseudo_label.threshold"]))
    assert final.data.params["stages.self_train.epochs"] == "2"
    versions = MlflowClient(search["uri"]).search_model_versions("name = 'selftune-quickstart'")
    assert versions and versions[0].run_id == final.info.run_id
