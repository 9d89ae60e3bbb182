"""Class-balanced thresholds (DST-CBC, Algorithm 1) on the sample a labeller holds: selftune vs the authors' sort.

This times threshold computation only (for labelling throughput see ``labelling_throughput.py``).
The input is what a labelling pass keeps after sampling: compact, contiguous arrays of the
sampled pixels (float32 max softmax, uint8 argmax), ``--pixels / --sample-every`` of them — not a
strided view of full-resolution maps. Every arm gets the same arrays and computes the same
thresholds (checked bit for bit):

streamed: ``class_balanced_thresholds_from_sample`` (torch): radix selection, three histogram
passes streamed over the sample in fixed-size blocks (``keep_small_classes=False``, the same rule).
radix: ``class_balanced_thresholds(conf, classes.long(), ..., sample_every=1)``, the call
``stages/dst_cbc.py`` makes today (the ``.long()`` included).
authors: ``class_balanced_thresholds_reference`` (numpy, ``sample_every=1``): per class a boolean
mask over the sample and an ``np.sort`` of that class's confidences.

Timing: one warm-up call per arm, then ``--repeats`` rounds in alternating order (ABC, CBA, ABC …),
min / median / max per arm, and per round the paired ratio to ``streamed``. torch runs
``--threads`` threads (default 1, numpy's sort is single-threaded: the same on every side).
Timed with glibc's default allocator, as a labeller runs. Memory, in a second process of this
script: peak resident set size above the level before the call, sampled every millisecond
(``/proc/self/statm``; torch's allocator is invisible to tracemalloc), under
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed buffers above 64 KiB at once and one
arm's freed heap does not hide the next arm's use (that setting makes every large temporary a
fresh mmap and page-faults it in, which is why the timing is not taken under it).

    PYTHONPATH=platform python benchmarks/class_balanced_thresholds.py [--pixels 60e6] [--classes 21] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable

import numpy as np
import torch

from selftune.methods.dst_cbc import (
    class_balanced_thresholds,
    class_balanced_thresholds_from_sample,
    class_balanced_thresholds_reference,
)

from _measure import alternating_times, peak_rss_above_baseline  # benchmarks/, the script's own folder


def synthetic_sample(samples: int, classes: int, seed: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(samples,) float32 max softmax and (samples,) uint8 argmax, shaped like a trained network's.

    Classes are imbalanced (Dirichlet(0.5) frequencies). Confidence is drawn as
    ``1/C + (1 - 1/C) * Beta(a_c, 1)``, peaked towards 1 with a per-class peak ``a_c`` in [1, 8],
    and 5 % of the pixels are saturated at exactly 1.0, as softmax outputs of confident networks
    are in float32. Built chunk by chunk so no float64 temporaries of the full size exist.
    """
    rng = np.random.default_rng(seed)
    frequency = rng.dirichlet(np.full(classes, 0.5))
    peak = rng.uniform(1.0, 8.0, size=classes)
    confidence = np.empty(samples, dtype=np.float32)
    prediction = np.empty(samples, dtype=np.uint8)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        pred = rng.choice(classes, size=n, p=frequency).astype(np.uint8)
        conf = 1.0 / classes + (1.0 - 1.0 / classes) * rng.beta(peak[pred], 1.0)
        conf[rng.random(n) < 0.05] = 1.0
        confidence[start : start + n] = conf
        prediction[start : start + n] = pred
    return confidence, prediction


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def memory_in_child(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """{alpha: {arm: peak bytes}} from this script re-run with the fixed mmap threshold."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(alpha: float, times: dict[str, list[float]], memory: dict[str, int], agree: bool) -> None:
    base = times["streamed"]
    for name, seconds in times.items():
        paired = [s / b for s, b in zip(seconds, base)]  # this arm / streamed, round by round
        print(f"{alpha:>6.2f} {name:>9} {min(seconds):>8.3f} {statistics.median(seconds):>8.3f} {max(seconds):>8.3f} "
              f"{statistics.median(seconds) / statistics.median(base):>9.2f}x "
              f"{min(paired):>6.2f}-{max(paired):<5.2f} {memory[name] / 2**20:>9.1f} {str(agree):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=float, default=60e6, help="unlabelled pixels the sample is drawn from")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--sample-every", type=int, default=16, help="authors: 16")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.6])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numpy's sort uses one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    samples = int(args.pixels) // args.sample_every
    confidence, prediction = synthetic_sample(samples, args.classes, args.seed)
    conf_t, pred_t = torch.from_numpy(confidence), torch.from_numpy(prediction)  # shared memory, no copy

    def arms_for(alpha: float) -> dict[str, Callable[[], np.ndarray]]:
        return {
            "streamed": lambda: class_balanced_thresholds_from_sample(
                conf_t, pred_t, args.classes, alpha, keep_small_classes=False).numpy(),
            "radix": lambda: class_balanced_thresholds(conf_t, pred_t.long(), args.classes, alpha, sample_every=1).numpy(),
            "authors": lambda: class_balanced_thresholds_reference(confidence, prediction, args.classes, alpha, sample_every=1),
        }

    if args.memory_only:
        print(json.dumps({str(alpha): {name: peak_rss_above_baseline(fn)[1] for name, fn in arms_for(alpha).items()}
                          for alpha in args.alphas}))
        return
    print(f"{samples / 1e6:.2f} M samples (every {args.sample_every}th of {args.pixels / 1e6:.0f} M pixels), "
          f"{args.classes} classes, {100 * float(np.mean(confidence == 1.0)):.1f} % saturated at p = 1.0; compact "
          f"float32 + uint8 arrays, {(confidence.nbytes + prediction.nbytes) / 2**20:.1f} MiB; torch threads "
          f"{torch.get_num_threads()}, numpy sort 1 thread; {args.repeats} alternating rounds")
    memory = memory_in_child(args)
    print(f"{'alpha':>6} {'arm':>9} {'min s':>8} {'median s':>8} {'max s':>8} {'/streamed':>10} {'paired':>12} "
          f"{'peak MiB':>9} {'same bits':>10}")
    for alpha in args.alphas:
        arms = arms_for(alpha)
        results = {name: fn() for name, fn in arms.items()}
        agree = all(same_bits(results["streamed"], result) for result in results.values())
        report(alpha, alternating_times(arms, args.repeats), memory[str(alpha)], agree)
    print("/streamed = median time / streamed's median (> 1: streamed faster); paired = the same ratio per round, "
          "min-max; peak MiB = RSS above baseline (1 ms sampling, MALLOC_MMAP_THRESHOLD_=65536)")


if __name__ == "__main__":
    main()
