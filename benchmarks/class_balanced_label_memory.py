"""Peak memory of class-balanced labelling's threshold pass as the unlabelled set grows.

The pass a ``class_balanced_label`` stage makes before labelling: per batch, (max p, argmax) of
every ``--sample-every``-th pixel, then per-class thresholds over the whole sample. Two arms:

old: what ``stages/dst_cbc.py`` does today — per batch ``torch.cat`` of the images' maps, then a
``[::n]`` *view* of it kept (``.float()`` of a float32 tensor is the same tensor, so the whole
full-resolution map stays alive), one ``torch.cat`` of the sample, ``.long()`` classes and
``class_balanced_thresholds(..., sample_every=1)`` (radix selection over the whole sample).
new: ``sample_confidences`` (a compact float32 + uint8 copy per image) kept as a list of pieces,
then ``class_balanced_thresholds_from_sample`` streaming over them in fixed-size blocks.

The probabilities are synthetic (softmax of scaled Gaussian logits, 64x64 images), generated on
the fly batch by batch from a seed per batch, so both arms see the same numbers and none are stored.
Each (arm, size) runs in its own process: peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` after imports and a warm-up batch) above the resident size at that
moment; glibc is told to serve every buffer above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``) so
freed buffers leave the resident set. Goal: the new arm's peak minus its sample's own bytes flat
within +-15 % from 1 000 to 16 000 images.

    PYTHONPATH=platform python benchmarks/class_balanced_label_memory.py [--images 1000 4000 16000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable

import torch

from selftune.methods.dst_cbc import (
    class_balanced_thresholds,
    class_balanced_thresholds_from_sample,
    sample_confidences,
    valid_pixels,
)

SIZE = 64


def synthetic_probs(batch_index: int, batch: int, classes: int) -> torch.Tensor:
    """(batch, classes, 64, 64) softmax probabilities, the same for a batch index in every process."""
    generator = torch.Generator().manual_seed(batch_index)
    return torch.softmax(4 * torch.randn(batch, classes, SIZE, SIZE, generator=generator), dim=1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS counter to the current RSS; return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


class OldArm:
    """stages/dst_cbc.py's ``sampled_confidences`` + ``global_thresholds`` as they are today."""

    def __init__(self, sample_every: int) -> None:
        self.sample_every, self.confidences, self.classes = sample_every, [], []

    def add(self, probs: torch.Tensor, sizes: torch.Tensor) -> None:
        confidence, prediction = probs.max(dim=1)
        conf = torch.cat([c[:h, :w].reshape(-1) for c, (h, w) in zip(confidence, sizes.tolist())])[:: self.sample_every]
        pred = torch.cat([p[:h, :w].reshape(-1) for p, (h, w) in zip(prediction, sizes.tolist())])[:: self.sample_every]
        self.confidences.append(conf.float())
        self.classes.append(pred.to(torch.uint8))

    def thresholds(self, num_classes: int, alpha: float) -> torch.Tensor:
        conf, pred = torch.cat(self.confidences), torch.cat(self.classes)
        return class_balanced_thresholds(conf, pred.long(), num_classes, alpha, sample_every=1)

    def sample_bytes(self) -> int:
        return sum(c.numel() * 5 for c in self.confidences)  # what a compact sample of it would take


class NewArm:
    """``sample_confidences`` per batch, pieces kept, ``class_balanced_thresholds_from_sample``."""

    def __init__(self, sample_every: int) -> None:
        self.sample_every, self.confidences, self.classes = sample_every, [], []

    def add(self, probs: torch.Tensor, sizes: torch.Tensor) -> None:
        conf, cls = sample_confidences(probs, valid_pixels(sizes, *probs.shape[2:]), self.sample_every)
        self.confidences.append(conf)
        self.classes.append(cls)

    def thresholds(self, num_classes: int, alpha: float) -> torch.Tensor:
        # keep_small_classes=False: the old rule, so the two arms' thresholds can be compared bit for bit
        return class_balanced_thresholds_from_sample(
            self.confidences, self.classes, num_classes, alpha, keep_small_classes=False
        )

    def sample_bytes(self) -> int:
        return sum(c.nbytes + k.nbytes for c, k in zip(self.confidences, self.classes))


ARMS: dict[str, Callable[[int], OldArm | NewArm]] = {"old": OldArm, "new": NewArm}


def child(args: argparse.Namespace) -> None:
    """One arm at one size; prints one JSON line."""
    torch.set_num_threads(args.threads)
    sizes = torch.full((args.batch, 2), SIZE)
    warm = ARMS[args.arm](args.sample_every)
    warm.add(synthetic_probs(10**9, args.batch, args.classes), sizes)
    warm.thresholds(args.classes, args.alpha)
    del warm
    baseline = _reset_peak()
    arm = ARMS[args.arm](args.sample_every)
    for index in range(0, args.child_images, args.batch):
        arm.add(synthetic_probs(index, min(args.batch, args.child_images - index), args.classes), sizes[: args.child_images - index])
    thresholds = arm.thresholds(args.classes, args.alpha)
    peak = _status_kib("VmHWM") * 1024 - baseline
    print(json.dumps({"peak": peak, "sample": arm.sample_bytes(), "thresholds": thresholds.view(torch.int32).tolist()}))


def measure(arm: str, images: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--arm", arm, "--child-images", str(images), "--batch", str(args.batch),
               "--classes", str(args.classes), "--alpha", str(args.alpha), "--sample-every", str(args.sample_every),
               "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--batch", type=int, default=64, help="the synthetic pipelines' eval_batch_size")
    parser.add_argument("--classes", type=int, default=6, help="the synthetic dataset: background + 5")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--sample-every", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both arms")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args)
        return
    print(f"{SIZE}x{SIZE} images, batch {args.batch}, {args.classes} classes, every {args.sample_every}th pixel, "
          f"alpha {args.alpha}, torch threads {args.threads}; MiB = peak RSS above the level after a warm-up batch")
    print(f"{'images':>7} {'sample MiB':>11} {'old peak':>9} {'new peak':>9} {'old/new':>8} "
          f"{'old - sample':>13} {'new - sample':>13} {'same thresholds':>16}")
    rows = []
    for turn, images in enumerate(args.images):
        order = ["old", "new"] if turn % 2 == 0 else ["new", "old"]
        result = {arm: measure(arm, images, args) for arm in order}
        old, new = result["old"], result["new"]
        rows.append((images, new["peak"] - new["sample"]))
        mib = 2**20
        print(f"{images:>7} {new['sample'] / mib:>11.2f} {old['peak'] / mib:>9.1f} {new['peak'] / mib:>9.1f} "
              f"{old['peak'] / max(new['peak'], 1):>7.2f}x {(old['peak'] - old['sample']) / mib:>13.1f} "
              f"{(new['peak'] - new['sample']) / mib:>13.1f} {str(old['thresholds'] == new['thresholds']):>16}")
    first = rows[0][1]
    for images, beyond in rows[1:]:
        print(f"new arm beyond its sample, {images} vs {rows[0][0]} images: {beyond / max(first, 1):.2f}x")


if __name__ == "__main__":
    main()
