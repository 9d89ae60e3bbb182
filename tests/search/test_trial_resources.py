"""How a search shares the machine: concurrent trials must run their stages at the same time, and
a trial that cannot fit on the cluster is refused up front instead of waiting forever."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from selftune.config import ResourcesConfig
from selftune.errors import ConfigError
from selftune.search.driver import max_concurrent
from selftune.search.space import load_search_space
from selftune.search.trial import TRIAL_ACTOR_CPUS, local_stage_cpus

from support import REPO


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote
def stage_task(folder: str, me: int) -> bool:
    """True once the other stage task is running too (a task still queued never shows up). A file,
    not a Ray call, signals arrival: a task blocked in ray.get lends its CPUs out, which would hide
    the queueing this test is about."""
    Path(folder, f"arrived-{me}").touch()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if Path(folder, f"arrived-{1 - me}").exists():
            return True
        time.sleep(0.05)
    return False


def test_two_one_cpu_trials_run_their_local_stages_at_once_on_two_cpus(two_cpu_ray, tmp_path):
    # What Tune reserves for each running trial's actor: a placement group of one small bundle.
    trials = [ray.util.placement_group([{"CPU": TRIAL_ACTOR_CPUS}]) for _ in range(2)]
    ray.get([trial.ready() for trial in trials])
    cpus = local_stage_cpus(ResourcesConfig(workers=0, cpus_per_worker=1))
    met = ray.get([stage_task.options(num_cpus=cpus).remote(str(tmp_path), me) for me in range(2)], timeout=120)
    for trial in trials:
        ray.util.remove_placement_group(trial)
    assert met == [True, True]


def space_with(tmp_path, **resources):
    pipeline = (REPO / "pipelines" / "quickstart.yaml").read_text()
    (tmp_path / "p.yaml").write_text(pipeline)
    (tmp_path / "s.yaml").write_text(
        "pipeline: p.yaml\nparams:\n  stages.pseudo_label.threshold: {type: float, low: 0.5, high: 0.9}\n"
        "budget: {num_samples: 4, max_concurrent: 4}\n"
    )
    return load_search_space(tmp_path / "s.yaml", [f"resources.{k}={v}" for k, v in resources.items()])


def test_local_mode_trials_fill_the_cpus(two_cpu_ray, tmp_path):
    assert max_concurrent(space_with(tmp_path, workers=0, cpus_per_worker=1)) == 2


def test_a_worker_group_that_cannot_fit_beside_its_trial_is_refused(two_cpu_ray, tmp_path):
    # 2 workers x 1 CPU + the trial actor's share is more than 2 CPUs: it would wait forever.
    with pytest.raises(ConfigError, match=r"s\.yaml: a trial needs 2\.01 CPUs .* the cluster has 2; lower resources\.workers"):
        max_concurrent(space_with(tmp_path, workers=2, cpus_per_worker=1))
