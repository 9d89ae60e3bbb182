"""Class-balanced thresholds (DST-CBC, Algorithm 1): selftune's radix selection vs the authors' sort.

selftune: ``methods.dst_cbc.class_balanced_thresholds`` (torch, CPU here): every n-th pixel, then
three ``bincount`` passes over the float32 bit patterns — linear time, no sort.
authors: ``class_balanced_thresholds_reference`` (numpy): every n-th pixel, then per class a
boolean mask over all samples and an ``np.sort`` of that class's confidences.

The unlabelled set is synthetic but shaped like real network output: realistic peaked confidences
(max softmax p per pixel, float32) and predicted classes (uint8) for ``--classes`` imbalanced
classes, built in chunks — the form a labelling pass keeps. Both functions get the same arrays.

Measured in one run, per alpha: median wall time over ``--repeats`` (after one warm-up), the time
ratio, peak extra memory and the largest absolute threshold difference. Memory, for both sides
alike: peak resident set size above the level just before the call, sampled every millisecond by a
thread reading /proc/self/statm (torch's CPU allocator is invisible to tracemalloc); for the numpy
side tracemalloc's peak is printed as well (it sees numpy's buffers exactly). The script re-runs
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every buffer above 64 KiB by mmap
and returns it on free: otherwise glibc raises that threshold after the first large free, reuses
freed heap for later buffers and the RSS of the second function reads as ~0.

    PYTHONPATH=platform python benchmarks/pseudo_label_throughput.py [--pixels 60e6] [--classes 21]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
import tracemalloc
from typing import Callable

import numpy as np
import torch

from selftune.methods.dst_cbc import class_balanced_thresholds, class_balanced_thresholds_reference

PAGE = os.sysconf("SC_PAGE_SIZE")


def synthetic_confidences(pixels: int, classes: int, seed: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(pixels,) float32 max softmax and (pixels,) uint8 argmax, shaped like a trained network's.

    Classes are imbalanced (Dirichlet(0.5) frequencies). Confidence is drawn as
    ``1/C + (1 - 1/C) * Beta(a_c, 1)``, peaked towards 1 with a per-class peak ``a_c`` in [1, 8],
    and 5 % of the pixels are saturated at exactly 1.0, as softmax outputs of confident networks
    are in float32. Built chunk by chunk so no float64 temporaries of the full size exist.
    """
    rng = np.random.default_rng(seed)
    frequency = rng.dirichlet(np.full(classes, 0.5))
    peak = rng.uniform(1.0, 8.0, size=classes)
    confidence = np.empty(pixels, dtype=np.float32)
    prediction = np.empty(pixels, dtype=np.uint8)
    for start in range(0, pixels, chunk):
        n = min(chunk, pixels - start)
        pred = rng.choice(classes, size=n, p=frequency).astype(np.uint8)
        conf = 1.0 / classes + (1.0 - 1.0 / classes) * rng.beta(peak[pred], 1.0)
        conf[rng.random(n) < 0.05] = 1.0
        confidence[start : start + n] = conf
        prediction[start : start + n] = pred
    return confidence, prediction


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_above_baseline(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn``; return its result and the peak RSS above the level before, sampled every ms."""
    gc.collect()
    baseline = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak, _rss()) - baseline


def tracemalloc_peak(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def max_difference(fast: np.ndarray, reference: np.ndarray) -> float:
    """Largest |fast - reference| over classes; equal infinities (empty class, alpha = 1) count 0."""
    same = (fast == reference) | (np.isinf(fast) & np.isinf(reference) & (np.sign(fast) == np.sign(reference)))
    return float(np.max(np.where(same, 0.0, np.abs(fast.astype(np.float64) - reference.astype(np.float64)))))


def _with_fixed_mmap_threshold() -> None:
    """Re-exec once with a fixed glibc mmap threshold (see the module docstring)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    _with_fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=float, default=60e6, help="unlabelled pixels (>= 50 million for the report)")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--sample-every", type=int, default=16, help="authors: 16")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pixels = int(args.pixels)
    started = time.perf_counter()
    confidence, prediction = synthetic_confidences(pixels, args.classes, args.seed)
    conf_t, pred_t = torch.from_numpy(confidence), torch.from_numpy(prediction)  # shared memory, no copy
    saturated = float(np.mean(confidence == 1.0))
    print(f"{pixels / 1e6:.1f} M pixels, {args.classes} classes, every {args.sample_every}th pixel sampled "
          f"({pixels // args.sample_every / 1e6:.2f} M samples), {100 * saturated:.1f} % saturated at p = 1.0; "
          f"inputs {(confidence.nbytes + prediction.nbytes) / 2**20:.0f} MiB, built in {time.perf_counter() - started:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'alpha':>6} {'selftune s':>11} {'authors s':>10} {'time ratio':>11} {'selftune MiB':>13} {'authors MiB':>12} "
          f"{'authors tracemalloc MiB':>24} {'memory ratio':>13} {'max |dt|':>9}")
    for alpha in args.alphas:
        def fast():
            return class_balanced_thresholds(conf_t, pred_t, args.classes, alpha, sample_every=args.sample_every).numpy()

        def reference():
            return class_balanced_thresholds_reference(confidence, prediction, args.classes, alpha, sample_every=args.sample_every)

        fast_s, ref_s = median_seconds(fast, args.repeats), median_seconds(reference, args.repeats)
        fast_result, fast_mem = peak_rss_above_baseline(fast)
        ref_result, ref_mem = peak_rss_above_baseline(reference)
        ref_traced = tracemalloc_peak(reference)
        difference = max_difference(fast_result, ref_result)
        print(f"{alpha:>6.2f} {fast_s:>11.3f} {ref_s:>10.3f} {ref_s / fast_s:>10.2f}x {fast_mem / 2**20:>13.1f} "
              f"{ref_mem / 2**20:>12.1f} {ref_traced / 2**20:>24.1f} {ref_mem / max(fast_mem, 1):>12.2f}x {difference:>9.2g}")
    print("time ratio = authors / selftune (> 1: selftune faster); memory ratio = authors / selftune, "
          "peak RSS above baseline (1 ms sampling, MALLOC_MMAP_THRESHOLD_=65536)")


if __name__ == "__main__":
    main()
