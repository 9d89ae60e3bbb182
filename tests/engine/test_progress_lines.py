"""Progress lines: step n/N, images/s and ETA redrawn on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from selftune.config import OptimizerConfig
from selftune.data.batches import TwoStreamBatch
from selftune.engine import progress as progress_module
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, fit, images_in
from selftune.engine.progress import LOG_LINES, EpochProgress, ProgressLine, counted, format_duration
from selftune.stages.training import epoch_lines


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Tick(Hook):
    """Moves the fake clock before every step: each step takes ``seconds``."""

    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds = clock, seconds

    def before_step(self, state, model) -> None:
        self.clock.now += self.seconds


class Evaluation(Hook):
    """Work after the steps (what EvaluateSplits does): ``seconds`` of the clock."""

    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds = clock, seconds

    def after_epoch(self, state, model) -> None:
        self.clock.now += self.seconds


class EpochLine(Hook):
    """Stands for LogEpoch: the epoch's one result line, on the same stream."""

    def __init__(self, stream, progress: EpochProgress):
        self.stream, self.progress = stream, progress

    def after_epoch(self, state, model) -> None:
        self.stream.write(f"  [s] epoch {state.epoch}/{state.epochs}  ({self.progress.epoch_rate()})\n")


def _batches(images: int = 4):
    torch.manual_seed(0)
    x = torch.randn(images, 2)
    return itertools.repeat({"image": x, "y": x.sum(dim=1, keepdim=True)})


def _loss(model, batch, state):
    return {"mse": ((model(batch["image"]) - batch["y"]) ** 2).mean()}


def _train(stream, *, epochs: int, steps: int, seconds_per_step: float, workers: int = 1, enabled: bool = True,
           evaluation_s: float = 0.0):
    clock = Clock()
    progress = EpochProgress("s", enabled=enabled, workers=workers, stream=stream, clock=clock)
    fit(nn.Linear(2, 1), _batches(), epochs=epochs, steps_per_epoch=steps, compute_losses=_loss,
        optimizer=OptimizerConfig(lr=0.01), ctx=WorkerContext.local("cpu"),
        hooks=[Tick(clock, seconds_per_step), Evaluation(clock, evaluation_s), progress, EpochLine(stream, progress)])
    return progress


def test_the_line_shows_step_of_total_images_per_second_and_eta_from_the_clock():
    clock = Clock()
    line = ProgressLine(io.StringIO(), clock=clock)
    line.start("  [s] epoch 1 of 3:", 10)
    assert line.text() == "  [s] epoch 1 of 3:  step 0/10"  # no time passed, nothing done: no rate, no ETA
    clock.now += 4.0
    line.advance(2, images=32)  # 2 steps of 16 images in 4 s: 8 img/s; 8 steps left at 2 s each
    assert line.text() == "  [s] epoch 1 of 3:  step 2/10  8.0 img/s  ETA 0:16"
    two = ProgressLine(io.StringIO(), clock=clock, workers=2)  # every worker trains all steps, on its own images
    two.start("x", 10)
    clock.now += 4.0
    two.advance(2, images=32)
    assert two.text() == "x  step 2/10  16.0 img/s  ETA 0:16"
    steps_only = ProgressLine(io.StringIO(), clock=clock)
    steps_only.start("x", 10)
    clock.now += 4.0
    steps_only.advance(1)
    assert steps_only.text() == "x  step 1/10  0.25 step/s  ETA 0:36"


def test_durations_read_as_minutes_or_hours():
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7384)] == ["0:00", "0:59", "1:01", "59:59", "1:00:00", "2:03:04"]


def test_on_a_terminal_the_line_is_redrawn_in_place_and_erased_before_the_epoch_line():
    terminal = Terminal()
    _train(terminal, epochs=2, steps=5, seconds_per_step=1.0, evaluation_s=2.0)
    out = terminal.getvalue()
    assert out.count("\n") == 2  # only the two epochs' lines end a line
    assert out.count("\r") >= 2 * 5  # each step redrawn (1 s apart > REDRAW_S), plus the erasing
    first, second = out.split("\n")[:2]
    assert "\r  [s] epoch 1 of 2:  step 5/5  4.0 img/s  ETA 0:00" in first
    # Erased (spaces, \r), then the result line: the whole epoch's time, the steps' images/s.
    assert first.endswith("\r  [s] epoch 1/2  (7.0s, 4 img/s)")
    assert second.split("\r")[-1] == "  [s] epoch 2/2  (7.0s, 4 img/s)"


def test_in_a_log_short_epochs_write_exactly_one_line_each():
    log = io.StringIO()
    _train(log, epochs=3, steps=20, seconds_per_step=1.0)  # 20 s epochs: under LOG_EVERY_S
    lines = log.getvalue().splitlines()
    assert lines == [f"  [s] epoch {e}/3  (20.0s, 4 img/s)" for e in (1, 2, 3)]
    assert "\r" not in log.getvalue()


def test_in_a_log_a_long_epoch_shows_life_at_most_every_30_s_and_ten_times():
    log = io.StringIO()
    _train(log, epochs=1, steps=100, seconds_per_step=1.0)  # 100 s: lines at 30, 60 and 90 s
    assert log.getvalue().splitlines() == [
        "  [s] epoch 1 of 1:  step 30/100  4.0 img/s  ETA 1:10", "  [s] epoch 1 of 1:  step 60/100  4.0 img/s  ETA 0:40",
        "  [s] epoch 1 of 1:  step 90/100  4.0 img/s  ETA 0:10", "  [s] epoch 1/1  (100.0s, 4 img/s)",
    ]
    log = io.StringIO()
    _train(log, epochs=1, steps=1000, seconds_per_step=10.0)  # ~2.8 hours: the interval grows to 1000 s
    lines = log.getvalue().splitlines()
    assert len(lines) - 1 <= LOG_LINES and len(lines) - 1 >= LOG_LINES - 1
    assert all("epoch 1/1" not in line for line in lines[:-1])  # "epoch e/E" marks the epoch's end only


def test_rank_above_0_and_the_switch_write_nothing(monkeypatch):
    terminal = Terminal()
    _train(terminal, epochs=1, steps=5, seconds_per_step=1.0, enabled=False)  # what a rank > 0 gets
    assert terminal.getvalue() == "  [s] epoch 1/1  (5.0s, 4 img/s)\n"  # the rate is kept, nothing drawn
    monkeypatch.setenv(progress_module.ENV_SWITCH, "0")
    terminal = Terminal()
    _train(terminal, epochs=1, steps=5, seconds_per_step=1.0)
    assert "\r" not in terminal.getvalue()


def test_stage_epoch_lines_print_on_rank_0_only_one_per_epoch_with_images_per_second(capsys):
    def run(rank: int) -> str:
        ctx = WorkerContext(rank=rank)  # (one process: DDP would need a process group)
        fit(nn.Linear(2, 1), _batches(), epochs=2, steps_per_epoch=3, compute_losses=_loss,
            optimizer=OptimizerConfig(lr=0.01), ctx=ctx, hooks=epoch_lines(ctx, "supervised", shown="train/loss"))
        return capsys.readouterr().out

    lines = run(0).splitlines()
    assert len(lines) == 2 and all(line.startswith("  [supervised] epoch ") and " img/s)" in line for line in lines)
    assert run(1) == ""


def test_labelling_counts_images_of_all_workers_out_of_the_total():
    clock, terminal = Clock(), Terminal()
    shard = [{"image": torch.zeros(n, 3, 2, 2)} for n in (4, 4, 2)]  # rank 0's 10 of 19 images (2 workers)
    seen = []
    for batch in counted(shard, "  [p] labelling", 19, workers=2, stream=terminal, clock=clock):
        clock.now += 1.0
        seen.append(batch)
    assert seen == shard  # the batches pass unchanged
    draws = terminal.getvalue().split("\r")
    assert "  [p] labelling  images 8/19  8.0 img/s  ETA 0:02" in [d.rstrip() for d in draws]  # 8 of rank 0's 10
    assert "  [p] labelling  images 19/19  6.7 img/s  ETA 0:00" in [d.rstrip() for d in draws]  # 10 × 2 > 19
    assert terminal.getvalue().endswith("\r")  # erased when the pass ends
    quiet = Terminal()
    list(counted(shard, "x", 19, enabled=False, stream=quiet, clock=clock))
    assert quiet.getvalue() == ""


def test_images_are_counted_in_both_streams_of_a_two_stream_batch():
    batch = TwoStreamBatch({"image": torch.zeros(3, 1)}, {"image": torch.zeros(5, 1)})
    assert images_in(batch) == 8 and images_in({"image": torch.zeros(2, 1)}) == 2 and images_in({"x": torch.zeros(2)}) == 0


@pytest.mark.parametrize("command", ["run", "final"])
def test_no_progress_on_the_command_line_sets_the_switch_for_this_process_and_its_workers(monkeypatch, tmp_path, command):
    from selftune.cli import main

    monkeypatch.setenv(progress_module.ENV_SWITCH, "1")  # restored after the test
    args = ["run", str(tmp_path / "missing.yaml")] if command == "run" else ["final", "--params", str(tmp_path / "p.yaml"), str(tmp_path / "missing.yaml")]
    assert main([*args, "--no-progress"]) == 2  # the missing file ends it, after the switch was set
    assert not progress_module.progress_wanted()


def test_a_worker_line_does_not_go_through_print(monkeypatch, capsys):
    """Ray Train replaces ``print`` in its workers with one that prints and also logs (each epoch
    line showed twice on a terminal with ``workers > 0``); the context writes to stdout itself."""
    import builtins

    from selftune.engine.context import WorkerContext

    def patched_print(*args, **kwargs):
        raise AssertionError("ctx.log went through print")

    monkeypatch.setattr(builtins, "print", patched_print)
    WorkerContext.local("cpu").log("  [supervised] epoch 1/2  loss 0.5")
    WorkerContext(rank=1).log("from rank 1")
    monkeypatch.undo()
    assert capsys.readouterr().out == "  [supervised] epoch 1/2  loss 0.5\n"
