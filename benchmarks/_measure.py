"""Measuring helpers shared by the benchmarks: alternating-order timing and peak RSS of a call."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_above_baseline(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn``; return its result and the peak RSS above the level before, sampled every ms
    (torch's allocator is invisible to tracemalloc)."""
    gc.collect()
    baseline = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak, rss_bytes()) - baseline


def alternating_times(arms: dict[str, Callable[[], object]], repeats: int, *, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each arm over ``repeats`` rounds, the order reversed every other round
    (ABC, CBA, …) so a drift in machine speed favours no arm; one untimed call each first."""
    if warm_up:
        for fn in arms.values():
            fn()
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - started)
    return times
