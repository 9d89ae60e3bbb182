"""Population-based training over a curriculum's rounds: per-round values, the bad inputs a PBT
space can have, and one real population on DST-CBC whose exploits go through the stage cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import selftune.stages  # noqa: F401  (registers the stage kinds the pipelines use)
from selftune.errors import ConfigError
from selftune.runner.cache import stage_keys
from selftune.search import pbt
from selftune.search.space import load_search_space
from support import REPO

DST_CBC = REPO / "pipelines" / "dst_cbc.yaml"
ALPHA, GAMMA = "stages.dst.stages.label.alpha", "stages.dst.stages.train.gamma"
TINY_DST = {
    "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 6, "stages.dst.rounds": 3,
    "stages.dst.stages.train.epochs": 1, "stages.dst.stages.train.steps_per_epoch": 4, "data.selection": 8,
}


def pbt_space(tmp_path, params=None, scheduler=None, **extra) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pbt", "pipeline": str(DST_CBC), "set": TINY_DST,
        "params": params or {ALPHA: {"type": "float", "low": 0.2, "high": 1.0}, GAMMA: {"type": "float", "low": 0.0, "high": 12.0}},
        "scheduler": {"name": "pbt", "population": 4, "perturbation_interval": 1, **(scheduler or {})}, **extra,
    }))
    return path


def test_values_inside_a_rounds_group_are_the_mutable_ones(tmp_path):
    space = load_search_space(pbt_space(tmp_path, params={
        ALPHA: {"type": "float", "low": 0.2, "high": 1.0},
        GAMMA: {"type": "float", "low": 0.0, "high": 12.0, "mutable": False},
        "stages.supervised.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    }))
    assert list(pbt.mutable_values(space)) == [ALPHA]
    assert pbt.mutable_values(space)[ALPHA].schedule_path == "stages.dst.schedules.label.alpha"
    assert pbt.searched_group(space) == ("dst", 3)
    assert space.trial_budget == 4  # the population, not budget.num_samples


def test_the_rounds_run_keep_their_values_and_the_rest_take_the_current_one(tmp_path):
    space = load_search_space(pbt_space(tmp_path))
    config = {ALPHA: 0.7, GAMMA: 3.0}
    overrides = pbt.realised_overrides(space, config, {ALPHA: [0.2], GAMMA: [9.0]})
    assert overrides == {"stages.dst.schedules.label.alpha": {"shape": "list", "values": [0.2, 0.7, 0.7]},
                         "stages.dst.schedules.train.gamma": {"shape": "list", "values": [9.0, 3.0, 3.0]}}
    pipeline = space.pipeline_for(config, overrides=overrides)
    by_name = {stage.name: stage for stage in pipeline.stages}
    assert [by_name[f"dst-r{r}-label"].alpha for r in (1, 2, 3)] == [0.2, 0.7, 0.7]
    assert [by_name[f"dst-r{r}-train"].gamma for r in (1, 2, 3)] == [9.0, 3.0, 3.0]
    # rounds complete after each stage: supervised, r1-label, r1-train, r2-label, ...
    assert [pbt.rounds_done(pipeline, i, "dst") for i in range(len(pipeline.stages))] == [0, 0, 1, 1, 2, 2, 3]
    assert pbt.realised_after(overrides, space, 2) == {ALPHA: [0.2, 0.7], GAMMA: [9.0, 3.0]}


def test_the_round_clock_skips_the_burn_in_and_the_last_round():
    assert [pbt.reports_round(done, burn_in=0, rounds=3) for done in range(4)] == [True, True, True, False]
    assert [pbt.reports_round(done, burn_in=2, rounds=3) for done in range(4)] == [False, False, True, False]


def test_a_perturbed_value_stays_inside_its_range(tmp_path):
    space = load_search_space(pbt_space(tmp_path))
    mutable = pbt.mutable_values(space)
    assert pbt.within_bounds({ALPHA: 1.2, GAMMA: -0.5}, space, mutable) == {ALPHA: 1.0, GAMMA: 0.0}
    assert pbt.within_bounds({ALPHA: 0.5, GAMMA: 4.0}, space, mutable) == {ALPHA: 0.5, GAMMA: 4.0}


def test_the_initial_population_is_drawn_by_optuna_with_the_seed(tmp_path):
    space = load_search_space(pbt_space(tmp_path))
    first, again = pbt.initial_population(space), pbt.initial_population(space)
    assert first == again and len(first) == 4 and len({p[ALPHA] for p in first}) == 4
    assert all(0.2 <= p[ALPHA] <= 1.0 and 0.0 <= p[GAMMA] <= 12.0 for p in first)


@pytest.mark.parametrize("params, scheduler, message", [
    ({"stages.supervised.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "mutable": True}}, {},
     r"params\.stages\.supervised\.optimizer\.lr\.mutable: this value cannot change mid-run"),
    (None, {"perturbation_interval": 3}, r"scheduler\.perturbation_interval: must be less than the 3 rounds of stages\.dst"),
    (None, {"population": 1}, r"scheduler\.population: a population needs at least 2 trials, got 1"),
    ({"stages.supervised.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, {},
     r"params: pbt needs at least one value of a stage inside a rounds group"),
])
def test_bad_population_spaces_are_one_line_errors(tmp_path, params, scheduler, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(pbt_space(tmp_path, params=params, scheduler=scheduler))


def test_mutable_outside_pbt_is_an_error(tmp_path):
    path = pbt_space(tmp_path, params={ALPHA: {"type": "float", "low": 0.2, "high": 1.0, "mutable": True}},
                     scheduler={"name": "asha"})
    with pytest.raises(ConfigError, match=r"params\.stages\.dst\.stages\.label\.alpha\.mutable: only scheduler\.name pbt or pb2"):
        load_search_space(path)


def test_pb2_without_its_extra_names_the_extra_on_the_command_line(tmp_path):
    pytest.importorskip("ray")
    try:
        import GPy  # noqa: F401
        pytest.skip("GPy is installed here")
    except ImportError:
        pass
    path = pbt_space(tmp_path, scheduler={"name": "pb2"})
    result = subprocess.run([sys.executable, "-m", "selftune", "search", str(path), "--out", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "scheduler.name: pb2 needs GPy and scikit-learn" in line and 'pip install -e ".[pb2]"' in line
    assert "Traceback" not in result.stderr


def mlflow_runs(uri: str, kind: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`selftune.kind` = '{kind}'", max_results=1000)


@pytest.mark.slow
def test_a_population_exploits_through_the_stage_cache_and_its_best_schedule_replays(tmp_path, small_synthetic):
    """4 trials x 2 DST-CBC rounds on 2 CPUs. With 4 trials and quantile 0.25 one trial copies
    another at the boundary after round 1, whatever the scores (PBT sorts ties stably)."""
    space_file = pbt_space(tmp_path)
    raw = yaml.safe_load(space_file.read_text())
    raw["set"]["data.root"] = str(small_synthetic)
    raw["set"]["stages.dst.rounds"] = 2  # one boundary is enough to exploit, resume and replay
    space_file.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "selftune", "search", str(space_file), "--out", str(tmp_path / "runs")]
    first = subprocess.Popen(command, text=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in first.stdout:  # Ctrl-C right after the first exploit, then --resume: as for a TPE search
        lines.append(line)
        if "exploit after round 1: continues from trial" in line:
            first.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + first.communicate(timeout=300)[0]
    assert first.returncode == 130, output[-3000:]
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (folder,) = (tmp_path / "runs").glob("search-pbt-*")
    assert (folder / "population.png").is_file()
    tune_state = max((folder / "tune").glob("experiment_state-*.json"))
    assert len(json.loads(tune_state.read_text())["trial_data"]) == 4  # no trial twice in Tune
    space = load_search_space(space_file)
    records = {path.stem: json.loads(path.read_text()) for path in (folder / "pbt").glob("*.json")}
    assert len(records) == 4

    stage_runs = mlflow_runs(uri, "stage")
    keys_of = {}  # trial -> stage -> cache key of the stage runs it ran itself
    for run in stage_runs:
        keys_of.setdefault(run.data.tags["selftune.trial_id"], {})[run.data.tags["selftune.stage"]] = run.data.tags["selftune.cache_key"]
    # No computation twice. (A trial may run a stage *name* twice: Tune's state saved at Ctrl-C
    # predates the exploit that the first session made at round 1, so the resume redoes that
    # boundary, with other draws, and the clone's next round has other values: another key.)
    computed = [run.data.tags["selftune.cache_key"] for run in stage_runs
                if run.info.status == "FINISHED" and run.data.tags["selftune.cache"] == "miss"]
    assert len(computed) == len(set(computed))
    assert not [run for run in mlflow_runs(uri, "stage") + mlflow_runs(uri, "trial") if run.info.status == "RUNNING"]

    for record in records.values():  # an exploit is recorded once, the resume notwithstanding
        assert len(record["exploits"]) == len({(e["round"], e["donor"]) for e in record["exploits"]})
        assert [r["round"] for r in record["rounds"]][-1] == 2
    # The exploit in effect is a trial's last: it replaced every round up to its own with the
    # donor's (a resume can redo a boundary, so an earlier one may have been superseded).
    # A donor exploited itself at a later boundary no longer shows the rounds it lent: pick one that was not.
    clone, record = next((trial, r) for trial, r in sorted(records.items()) if r["exploits"] and all(
        e["round"] <= r["exploits"][-1]["round"] for e in records[r["exploits"][-1]["donor"]]["exploits"]))
    exploit = record["exploits"][-1]
    donor, upto = exploit["donor"], exploit["round"]
    # Rebuild the pipeline the clone ran from its realised values: the rounds up to the exploit
    # carry the donor's values, so their keys are the donor's stages, computed once (cache hits
    # for the clone), and the rounds after are the clone's own computations on top of them.
    for path in pbt.mutable_values(space):
        assert record["realised"][path][:upto] == records[donor]["realised"][path][:upto]
    pipeline = space.pipeline_for(record["config"], overrides=pbt.realised_overrides(space, record["config"], record["realised"]))
    keys = dict(zip([stage.name for stage in pipeline.stages], stage_keys(pipeline)))
    inherited = [f"dst-r{r}-{inner}" for r in range(1, upto + 1) for inner in ("label", "train")]
    assert all(keys[name] in set(computed) for name in inherited)
    assert all(keys_of[clone].get(name) != keys[name] for name in inherited)  # the clone did not compute them
    assert keys_of[clone]["dst-r2-train"] == keys["dst-r2-train"]  # what it then ran itself
    assert f"round {upto}: from trial {donor}" in trial_runs_exploits(uri, clone)
    (search_run,) = mlflow_runs(uri, "search")
    assert search_run.data.tags["selftune.best_schedule"] == str(folder / "best_schedule.yaml")
    trial_runs = {run.data.tags["selftune.trial_id"]: run for run in mlflow_runs(uri, "trial")}
    history = MlflowClient(uri).get_metric_history(trial_runs[clone].info.run_id, f"schedule/{ALPHA}")
    assert sorted(m.step for m in history) == [1, 2]

    final = subprocess.run([sys.executable, "-m", "selftune", "final", "--from", search_run.info.run_id, "--out", str(tmp_path / "final")],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    best = search_run.data.tags["selftune.best_trial_id"]
    (final_run,) = mlflow_runs(uri, "final")
    replayed = {run.data.tags["selftune.stage"]: run.data.tags.get("selftune.cache_key") for run in stage_runs_of(uri, final_run.info.run_id)}
    best_record = records[best]
    best_pipeline = space.pipeline_for(best_record["config"], overrides=pbt.realised_overrides(space, best_record["config"], best_record["realised"]))
    assert replayed == dict(zip([stage.name for stage in best_pipeline.stages], stage_keys(best_pipeline)))


def trial_runs_exploits(uri: str, trial_id: str) -> str:
    (run,) = [run for run in mlflow_runs(uri, "trial") if run.data.tags["selftune.trial_id"] == trial_id]
    return run.data.tags["selftune.pbt.exploits"]


def stage_runs_of(uri: str, parent_run_id: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=100)
