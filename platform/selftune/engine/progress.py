"""Progress of long work on the console: an epoch's steps, a labelling pass's images.

On a terminal (the stream is a TTY) one line is redrawn in place with ``\\r`` — ``step n/N``,
images/s, ETA — at most every ``REDRAW_S``, and erased when the work ends, so that only the
caller's result line stays (``epoch 3/8 loss … val mIoU …``). Anywhere else (a log file, a pipe,
a Ray worker's or a Ray job's log) nothing is redrawn: a long piece of work writes one plain line
at most every ``LOG_EVERY_S`` and at most ``LOG_LINES`` times in all, so a log shows life without
filling up, and work shorter than ``LOG_EVERY_S`` writes nothing. Those lines never contain
``epoch e/E``: that token marks an epoch's result line only.

Where it shows: ``selftune run`` in Ray Train's local mode (``workers: 0``) trains in the
terminal's process, so a terminal gets the redrawn line. Ray workers' stdout is a file (Ray
forwards it line by line), so with ``workers > 0`` and in a Ray job the log form applies. A
search's trials are Ray workers whose output the search keeps off its terminal: their lines go
only to the workers' Ray logs, and the search's own progress lines are unchanged.

Only rank 0 writes. ``SELFTUNE_PROGRESS=0`` (``selftune run --no-progress``) turns it off.
Images/s count all workers (rank 0's images times the workers; every rank draws the same batch
sizes). Timing is host time without a device sync: over an epoch the two agree.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from torch import nn

from selftune.engine.loop import Hook, TrainState, images_in

ENV_SWITCH = "SELFTUNE_PROGRESS"  # 0 / off / false / no: no progress lines
REDRAW_S = 0.2  # a terminal line is redrawn at most this often
LOG_EVERY_S = 30.0  # a log gets a progress line at most this often …
LOG_LINES = 10  # … and at most this many per piece of work (the interval grows with long work)

Clock = Callable[[], float]


def progress_wanted() -> bool:
    """False when ``SELFTUNE_PROGRESS`` says off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLine:
    """One piece of work at a time (``start`` … ``advance`` … ``finish``), shown as one line.

    ``workers``: how many processes share the work; counts ``shared`` between them (a labelling
    pass's images) and all images are shown for all of them. ``enabled=False``: a no-op (rank > 0).
    """

    def __init__(
        self, stream: TextIO | None = None, *, enabled: bool = True, workers: int = 1, clock: Clock = time.perf_counter,
    ):
        self.enabled, self.workers, self.clock = enabled, max(1, workers), clock
        self._stream = stream
        self.label, self.unit, self.total, self.shared = "", "step", 0, False
        self.done = self.images = 0
        self.started = self._drawn = self._logged = 0.0
        self._width = 0  # of the line on the terminal, to erase it
        self._tty = False
        self.log_lines = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout  # looked up late: tests swap sys.stdout

    def start(self, label: str, total: int, *, unit: str = "step", shared: bool = False) -> None:
        self.label, self.total, self.unit, self.shared = label, total, unit, shared
        self.done = self.images = self.log_lines = 0
        self.started = self._drawn = self._logged = self.clock()
        self._width = 0
        self._tty = self.enabled and _is_tty(self.stream)  # once per piece of work: isatty is a system call

    def advance(self, count: int = 1, images: int = 0) -> None:
        if not self.enabled:
            return
        self.done += count
        self.images += images
        now = self.clock()
        if self._tty:
            if now - self._drawn >= REDRAW_S or self.done >= self.total:
                self._redraw(now)
        elif self.done < self.total and now - self._logged >= self._log_interval(now):
            self._log(now)

    def finish(self) -> None:
        """Erase the terminal line (the caller prints the result); nothing in a log."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def images_per_s(self, now: float | None = None) -> float:
        """All workers' images per second since ``start`` (0 before any time passed)."""
        seconds = (self.clock() if now is None else now) - self.started
        return self.images * self.workers / seconds if seconds > 0 else 0.0

    def text(self, now: float | None = None) -> str:
        """``<label>  step 120/500  45.2 img/s  ETA 1:23`` (``<unit>/s`` when no images are counted)."""
        now = self.clock() if now is None else now
        seconds = now - self.started
        done = min(self.done * self.workers, self.total) if self.shared else self.done
        parts = [f"{self.label}  {self.unit} {done}/{self.total}"]
        if self.images and seconds > 0:
            parts.append(f"{self.images_per_s(now):.1f} img/s")
        elif seconds > 0:
            parts.append(f"{self.done / seconds:.2f} {self.unit}/s")
        if 0 < self.done and seconds > 0:
            own_total = -(-self.total // self.workers) if self.shared else self.total
            parts.append(f"ETA {format_duration(seconds / self.done * max(own_total - self.done, 0))}")
        return "  ".join(parts)

    def _redraw(self, now: float) -> None:
        line = self.text(now)[: max(20, shutil.get_terminal_size().columns - 1)]  # a wrapped line cannot be redrawn
        self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
        self.stream.flush()
        self._width, self._drawn = max(self._width, len(line)), now

    def _log_interval(self, now: float) -> float:
        """``LOG_EVERY_S``, longer for work whose expected length needs it to stay within ``LOG_LINES``."""
        if self.log_lines >= LOG_LINES:
            return float("inf")
        expected = (now - self.started) / self.done * self.total if self.done else 0.0
        return max(LOG_EVERY_S, expected / LOG_LINES)

    def _log(self, now: float) -> None:
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()
        self._logged, self.log_lines = now, self.log_lines + 1


class EpochProgress(Hook):
    """The steps of each epoch as a ``ProgressLine``: ``  [stage] epoch 3 of 8:  step 120/500  …``.

    Put it after the hooks whose ``after_epoch`` takes time (evaluation) and right before the one
    that prints the epoch's line: its ``after_epoch`` erases the terminal line. ``seconds`` (the
    whole epoch) and ``rate`` (training images/s, the steps' time only) describe the epoch just
    trained, for that line (``epoch_rate``)."""

    def __init__(self, stage_name: str, *, enabled: bool = True, workers: int = 1, stream: TextIO | None = None,
                 clock: Clock = time.perf_counter):
        self.stage_name = stage_name
        self.line = ProgressLine(stream, enabled=enabled and progress_wanted(), workers=workers, clock=clock)
        self.seconds = self.rate = 0.0
        self._images_before = 0
        self._steps_ended = 0.0

    def before_epoch(self, state: TrainState, model: nn.Module) -> None:
        self.line.start(f"  [{self.stage_name}] epoch {state.epoch} of {state.epochs}:", state.steps_per_epoch)
        self._images_before, self._steps_ended = state.images, self.line.started

    def after_step(self, state: TrainState, model: nn.Module) -> None:
        self.line.advance(1, state.images - self._images_before - self.line.images)
        self._steps_ended = self.line.clock()

    def after_epoch(self, state: TrainState, model: nn.Module) -> None:
        """The epoch's time (steps and the epoch's end: evaluation) and its training images/s (steps only)."""
        self.seconds = self.line.clock() - self.line.started
        stepping = self._steps_ended - self.line.started
        images = (state.images - self._images_before) * self.line.workers
        self.rate = images / stepping if stepping > 0 else 0.0
        self.line.finish()

    def epoch_rate(self) -> str:
        """``3.2s, 250 img/s`` for the epoch's result line."""
        return f"{self.seconds:.1f}s, {self.rate:.0f} img/s" if self.rate else f"{self.seconds:.1f}s"


def counted(batches: Iterable[Any], label: str, total: int, *, enabled: bool = True, workers: int = 1,
            stream: TextIO | None = None, clock: Clock = time.perf_counter) -> Iterator[Any]:
    """``batches`` as they are, with a ``ProgressLine`` of the images done out of ``total`` (all
    workers' images; this process's batches are its share): ``  [stage] labelling  images 320/1464  …``."""
    line = ProgressLine(stream, enabled=enabled and progress_wanted(), workers=workers, clock=clock)
    line.start(label, total, unit="images", shared=True)
    try:
        for batch in batches:
            yield batch
            images = images_in(batch)
            line.advance(images, images)
    finally:
        line.finish()
