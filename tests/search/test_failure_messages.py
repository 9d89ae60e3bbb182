"""What people read after a failure: one line naming the stage and the innermost cause (not Ray's
coloured traceback), and an interrupt line that counts only the trials that really ended."""

from __future__ import annotations

from types import SimpleNamespace

import cloudpickle
import ray.exceptions

from selftune.engine.loop import TrainingDiverged
from selftune.search.callbacks import Progress, failure_reason, trial_failure

DIVERGED = "training diverged: the loss became non-finite (loss nan, seg nan, pseudo 0); lower the learning rate"


def ray_wrapped(error: BaseException) -> BaseException:
    """``error`` as it reaches the search driver: Ray's task error, with the remote traceback (and
    its colour codes) in its text, and the original as its cause."""
    remote = "\x1b[36mray::_run_local_stage()\x1b[39m (pid=1, ip=127.0.0.1)\n" + "".join(
        f'  File "/x/trial.py", line {i}, in run\n    call()\n' for i in range(45))
    return ray.exceptions.RayTaskError("_run_local_stage", remote, error).as_instanceof_cause()


def failed_trial(tmp_path, error: BaseException, stages_done: int) -> SimpleNamespace:
    pickled = tmp_path / "error.pkl"
    pickled.write_bytes(cloudpickle.dumps(error))
    return SimpleNamespace(trial_id="t1", status="RUNNING", config={"lr": 1e30}, pickled_error_file=str(pickled),
                           get_pickled_error=lambda: cloudpickle.loads(pickled.read_bytes()),  # what Tune reads
                           error_file=None, last_result={"stage": stages_done, "stages_total": 3})


def test_a_diverged_stage_is_one_line_without_ray_colours():
    wrapped = ray_wrapped(TrainingDiverged(DIVERGED))
    assert "\x1b[" in str(wrapped) and len(str(wrapped).splitlines()) > 40  # what the tag held before
    assert failure_reason(wrapped) == DIVERGED


def test_a_foreign_error_keeps_its_type_and_only_its_first_line():
    assert failure_reason(ray_wrapped(ValueError("bad shape\nmore detail"))) == "ValueError: bad shape"


def test_the_trial_line_names_the_failing_stage(tmp_path):
    trial = failed_trial(tmp_path, ray_wrapped(TrainingDiverged(DIVERGED)), stages_done=2)
    names = lambda config: ["supervised", "pseudo_label", "self_train"]  # noqa: E731
    assert trial_failure(trial, names) == f"stage self_train: {DIVERGED}"
    lines: list[str] = []
    Progress(total=2, mode="max", say=lines.append, stage_names=names).on_trial_error(0, [trial], trial)
    assert lines == [f"▶ trial t1 FAILED (stage self_train: {DIVERGED}): 1/2 done, 0 running, best so far -"]


def test_the_interrupt_count_is_the_trials_that_ended():
    """Two trials ended before the interrupt (one in an earlier session); Tune then tore the four
    running ones down, marking them TERMINATED too: they have not ended."""
    progress = Progress(total=6, mode="max", say=lambda line: None)
    trials = [SimpleNamespace(trial_id=f"t{i}", status=status, last_result={"stage": 1, "stages_total": 3})
              for i, status in enumerate(["TERMINATED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "PENDING"])]
    progress.on_step_begin(0, trials)
    progress.on_trial_complete(1, trials, trials[1])  # stopped by ASHA
    for trial in trials:
        trial.status = "TERMINATED"
    progress.on_experiment_end(trials)
    assert progress.ended_ids == {"t0", "t1"}


def test_a_resumed_search_that_had_ended_counts_its_trials():
    # Tune takes no step when every restored trial has ended; the count comes from their states.
    progress = Progress(total=2, mode="max", say=lambda line: None)
    progress.on_experiment_end([SimpleNamespace(trial_id=f"t{i}", status="TERMINATED") for i in range(2)])
    assert len(progress.ended_ids) == 2


def test_without_tunes_pickled_copy_the_error_files_last_line_names_the_cause(tmp_path):
    from selftune.search.callbacks import trial_failure

    text = tmp_path / "error.txt"
    text.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                    "\x1b[31mselftune.engine.loop.TrainingDiverged: training diverged: the loss became non-finite\x1b[0m\n")
    trial = SimpleNamespace(trial_id="t1", status="ERROR", config={}, get_pickled_error=lambda: None,
                            error_file=str(text), last_result={"stage": 2, "stages_total": 3})
    assert trial_failure(trial, lambda config: ["supervised", "pseudo_label", "self_train"]) == \
        "stage self_train: training diverged: the loss became non-finite"


def test_an_interrupt_ends_every_trial_run_that_had_not_ended_killed(tracking_uri):
    """Tune stops a trial it tears down at its next report as it stops a finished one, and the
    trial's own process then ends its run FINISHED: only the trials Tune saw end keep that."""
    from mlflow import MlflowClient

    from selftune.search.callbacks import close_open_runs
    from selftune.tracking import create_run, ensure_experiment, finish_run

    experiment = ensure_experiment(tracking_uri, "interrupted")
    search = create_run(tracking_uri, experiment, name="search", kind="search")
    runs = {trial: create_run(tracking_uri, experiment, name=f"trial-{trial}", kind="trial", parent_run_id=search,
                              tags={"selftune.trial_id": trial}) for trial in ("ended", "torn_down", "running")}
    finish_run(tracking_uri, runs["ended"], "FINISHED")
    finish_run(tracking_uri, runs["torn_down"], "FINISHED")
    close_open_runs(tracking_uri, experiment, search, "KILLED", "interrupted", ended_trials={"ended"})
    status = {trial: MlflowClient(tracking_uri).get_run(run).info.status for trial, run in runs.items()}
    assert status == {"ended": "FINISHED", "torn_down": "KILLED", "running": "KILLED"}
    assert MlflowClient(tracking_uri).get_run(runs["torn_down"]).data.tags["selftune.error"] == "interrupted"
