"""The search's progress lines: counts, ASHA stops and the best finished objective so far."""

from __future__ import annotations

from types import SimpleNamespace

from selftune.search.callbacks import Progress


def trial(trial_id: str, status: str, stage: int, objective: float) -> SimpleNamespace:
    """What Progress reads of a Tune Trial when Tune calls it back."""
    return SimpleNamespace(trial_id=trial_id, status=status,
                           last_result={"stage": stage, "stages_total": 3, "objective": objective})


def test_progress_counts_ended_trials_and_keeps_the_best_full_run():
    lines: list[str] = []
    progress = Progress(total=3, mode="max", say=lines.append)
    a, b, c = trial("a", "RUNNING", 3, 0.70), trial("b", "RUNNING", 1, 0.90), trial("c", "RUNNING", 3, 0.72)
    progress.on_trial_complete(0, [a, b, c], a)  # Tune still marks the ending trial RUNNING here
    a.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b, c], b)  # stopped by ASHA after stage 1: its 0.90 is no final value
    b.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b, c], c)
    assert lines == [
        "▶ trial a done: 1/3 done, 2 running, best so far 0.7000",
        "▶ trial b stopped after stage 1: 2/3 done, 1 running, best so far 0.7000",
        "▶ trial c done: 3/3 done, 0 running, best so far 0.7200",
    ]
