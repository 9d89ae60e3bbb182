"""`selftune final` with `final: {top_k, seeds}` for real: a tiny three-trial search, then its two
best trials re-run on two seeds under one parent final run; the configuration kept is the one
with the best mean select mIoU, and only its model is registered."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from selftune.errors import ConfigError
from selftune.search.final import final_plan
from support import REPO

pytestmark = pytest.mark.slow

TINY = {
    "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 4,
    "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 4,
    "stages.pseudo_label.threshold": 0.5, "data.selection": 4,
}
SELF_TRAIN_LRS = [0.0005, 0.002, 0.008]  # the only sampled value: trials share their first two stages


def selftune(*args: str, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selftune", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def search(tmp_path_factory, session_home, small_synthetic):
    folder = tmp_path_factory.mktemp("final-top-k")
    space = folder / "space.yaml"
    lr = "stages.self_train.optimizer.lr"
    space.write_text(yaml.safe_dump({
        "name": "topk",
        "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {**TINY, "data.root": str(small_synthetic)},
        "params": {lr: {"type": "categorical", "choices": SELF_TRAIN_LRS}},
        "searcher": {"name": "random", "seed": 0, "points_to_evaluate": [{lr: value} for value in SELF_TRAIN_LRS]},
        "scheduler": {"name": "none"},
        "budget": {"num_samples": 3, "max_concurrent": 2},
    }))
    env = {**os.environ, "HOME": str(session_home), "OMP_NUM_THREADS": "1",
           "SELFTUNE_CACHE": str(session_home / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    done = selftune("search", str(space), cwd=folder, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"folder": folder, "env": env, "uri": env["MLFLOW_TRACKING_URI"]}


def all_runs(uri: str, filter_string: str = "") -> list:
    mlflow = MlflowClient(uri)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(experiments, filter_string=filter_string, max_results=1000)


def runs_of(uri: str, kind: str) -> list:
    return all_runs(uri, f"tags.`selftune.kind` = '{kind}'")


def test_top_k_more_than_the_finished_trials_is_one_line_naming_the_key(search):
    before = len(all_runs(search["uri"]))
    done = selftune("final", "--from", "topk", "--set", "final.top_k=4", cwd=search["folder"], env=search["env"], timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "final.top_k: 4 is more than the 3 trials" in done.stderr and "valid: 1 to 3" in done.stderr
    assert len(all_runs(search["uri"])) == before  # refused before any run was created


def test_top_k_reruns_the_best_trials_on_every_seed_and_keeps_the_best_mean(search):
    done = selftune("final", "--from", "topk", "--set", "final.top_k=2", "--set", "final.seeds=[0, 1]",
                    "--out", str(search["folder"] / "final"), cwd=search["folder"], env=search["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow = MlflowClient(search["uri"])
    (parent,) = [run for run in runs_of(search["uri"], "final") if "selftune.chosen_rank" in run.data.tags]
    seeds = runs_of(search["uri"], "final_seed")
    assert parent.info.status == "FINISHED" and all(run.info.status == "FINISHED" for run in seeds)
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in seeds)

    # top_k x seeds runs: the search's two best trials (by its objective), each on seeds 0 and 1
    trials = sorted(runs_of(search["uri"], "trial"), key=lambda run: run.data.metrics["objective"], reverse=True)
    top_two = {run.info.run_id for run in trials[:2]}
    assert sorted((run.data.tags["selftune.source_trial_run"], run.data.tags["selftune.seed"]) for run in seeds) == \
        sorted((trial, seed) for trial in top_two for seed in ("0", "1"))

    # the chosen configuration has the best mean select mIoU over its seeds
    by_trial = {trial: [run for run in seeds if run.data.tags["selftune.source_trial_run"] == trial] for trial in top_two}
    mean_select = {trial: statistics.mean(run.data.metrics["select/miou"] for run in group) for trial, group in by_trial.items()}
    chosen = parent.data.tags["selftune.source_trial_run"]
    assert mean_select[chosen] == max(mean_select.values())
    chosen_val = [run.data.metrics["val/miou"] for run in by_trial[chosen]]
    assert parent.data.metrics["seeds/val/miou_mean"] == pytest.approx(statistics.mean(chosen_val))
    assert parent.data.metrics["seeds/val/miou_std"] == pytest.approx(statistics.stdev(chosen_val))
    assert parent.data.metrics["seeds/select/miou_mean"] == pytest.approx(mean_select[chosen])
    assert {"top1/seeds/val/miou_mean", "top2/seeds/val/miou_std"} <= set(parent.data.metrics)
    assert "← chosen" in done.stdout and f"{statistics.mean(chosen_val):.4f} ± {statistics.stdev(chosen_val):.4f}" in done.stdout

    # one model version, from a run of the chosen configuration
    seed_runs = {run.info.run_id for run in seeds}
    (version,) = [v for v in mlflow.search_model_versions("name = 'selftune-quickstart'") if v.run_id in seed_runs]
    assert version.run_id == parent.data.tags["selftune.registered_run"]
    assert version.run_id in {run.info.run_id for run in by_trial[chosen]}

    # the stage store: on seed 0 (the search's) both configurations reuse the trials' stages; on
    # seed 1 the second reuses the first's supervised and pseudo_label stages
    stages = [run for run in runs_of(search["uri"], "stage")
              if mlflow.get_run(run.data.tags["mlflow.parentRunId"]).data.tags.get("selftune.kind") == "final_seed"]
    hits = sorted((run.data.tags["selftune.stage"], mlflow.get_run(run.data.tags["mlflow.parentRunId"]).data.tags["selftune.seed"])
                  for run in stages if run.data.tags["selftune.cache"] == "hit")
    assert hits == sorted([(stage, "0") for stage in ("supervised", "pseudo_label", "self_train")] * 2
                          + [("supervised", "1"), ("pseudo_label", "1")])
    assert not mlflow.search_runs([parent.info.experiment_id], filter_string="attributes.status = 'RUNNING'")


def test_the_default_top_k_is_one_final_run_of_the_best_trial(search):
    done = selftune("final", "--from", "topk", "--out", str(search["folder"] / "final-default"),
                    cwd=search["folder"], env=search["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (search_run,) = runs_of(search["uri"], "search")
    finals = [run for run in runs_of(search["uri"], "final") if "mlflow.parentRunId" not in run.data.tags
              and run.data.tags.get("selftune.output_dir", "").endswith("final-default")]
    (final,) = finals
    assert final.data.tags["selftune.source_trial_run"] == search_run.data.tags["selftune.best_trial_run_id"]
    versions = MlflowClient(search["uri"]).search_model_versions("name = 'selftune-quickstart'")
    assert [v.run_id for v in versions].count(final.info.run_id) == 1
    # the best trial's stages came from the store: nothing computed again
    assert {run.data.tags["selftune.cache"] for run in stage_runs_of(search["uri"], final.info.run_id)} == {"hit"}


def stage_runs_of(uri: str, parent_run_id: str) -> list:
    return all_runs(uri, f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`selftune.kind` = 'stage'")


def test_pruning_the_store_to_nothing_keeps_the_best_trial_and_every_registered_models_stages(search, capsys):
    from selftune.cli import main

    store = Path(search["env"]["SELFTUNE_STAGE_STORE"])
    assert main(["store", "list", "--store", str(store)]) == 0
    listed = capsys.readouterr().out
    assert "best trial" in listed and "model selftune-quickstart" in listed
    assert main(["store", "prune", "--store", str(store), "--max-size", "0"]) == 0
    assert "still above --max-size 0" in capsys.readouterr().out
    (search_run,) = runs_of(search["uri"], "search")
    needed = {(run.data.tags["selftune.stage"], run.data.tags["selftune.cache_key"])
              for run in stage_runs_of(search["uri"], search_run.data.tags["selftune.best_trial_run_id"])}
    for version in MlflowClient(search["uri"]).search_model_versions("name = 'selftune-quickstart'"):
        needed |= {(run.data.tags["selftune.stage"], run.data.tags["selftune.cache_key"])
                   for run in stage_runs_of(search["uri"], version.run_id)}
    left = {tuple(entry.name.rsplit("-", 1)) for entry in store.iterdir() if entry.is_dir()}
    assert left == needed  # everything else went
    again = selftune("final", "--from", "topk", "--out", str(search["folder"] / "final-after-prune"),
                     cwd=search["folder"], env=search["env"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (final,) = [run for run in runs_of(search["uri"], "final")
                if run.data.tags.get("selftune.output_dir", "").endswith("final-after-prune")]
    assert {run.data.tags["selftune.cache"] for run in stage_runs_of(search["uri"], final.info.run_id)} == {"hit"}


@pytest.mark.parametrize("top_k", [0, -1, 1.5, "3", True])
def test_top_k_must_be_a_positive_integer(top_k):
    with pytest.raises(ConfigError, match=r"^p.yaml: final.top_k: must be a positive integer"):
        final_plan({"final": {"top_k": top_k}}, "p.yaml")


def test_top_k_defaults_to_one():
    assert final_plan({"final": {"seeds": [0, 1]}}, "p.yaml").top_k == 1
