"""Pseudo-label storage: one PNG per image (what labelling stages write) vs one uncompressed zip
of the same PNGs per stage (readable one member at a time, without unpacking the rest).

Label maps come from the synthetic dataset's masks, resized (nearest) to ``--size`` (default
VOC-like 500x375) with a quarter of the pixels marked not kept (255) in blobs, as a thresholded
labeller leaves them. Per layout: bytes on disk (allocated blocks, what fills a volume), apparent
bytes, files, write seconds and the seconds to read ``--reads`` random labels back, in 3
alternating rounds (min / median / max), and the ratios zip / PNG folder.

    PYTHONPATH=platform python benchmarks/pseudo_label_storage.py [--images 2000] [--size 500 375]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from selftune.data.synthetic import ensure_synthetic


def label_maps(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    root = ensure_synthetic()
    masks = sorted((Path(root) / "masks").glob("*.png"))
    rng = np.random.default_rng(seed)
    maps = []
    for index in range(count):
        label = np.array(Image.open(masks[index % len(masks)]).resize(size, Image.NEAREST), dtype=np.uint8)
        blobs = np.array(Image.fromarray((rng.random((8, 8)) < 0.25).astype(np.uint8) * 255).resize(size, Image.NEAREST))
        label[blobs > 0] = 255
        maps.append(label)
    return maps


def png_bytes(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(folder: Path, encoded: list[bytes]) -> None:
    folder.mkdir()
    for index, data in enumerate(encoded):
        (folder / f"{index:06d}.png").write_bytes(data)


def write_zip(path: Path, encoded: list[bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, data in enumerate(encoded):
            archive.writestr(f"{index:06d}.png", data)


def read_folder(folder: Path, ids: list[int]) -> None:
    for index in ids:
        np.asarray(Image.open(folder / f"{index:06d}.png"))


def read_zip(path: Path, ids: list[int]) -> None:
    with zipfile.ZipFile(path) as archive:
        for index in ids:
            np.asarray(Image.open(io.BytesIO(archive.read(f"{index:06d}.png"))))


def on_disk(path: Path) -> tuple[int, int, int]:
    """(allocated bytes, apparent bytes, files) under ``path``."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [os.stat(p) for p in files]
    return sum(s.st_blocks * 512 for s in stats), sum(s.st_size for s in stats), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    encoded = [png_bytes(label) for label in label_maps(args.images, tuple(args.size))]
    ids = random.Random(0).sample(range(args.images), min(args.reads, args.images))
    times: dict[str, dict[str, list[float]]] = {"folder": {"write": [], "read": []}, "zip": {"write": [], "read": []}}
    sizes = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # on the volume a store would use, not a tmpfs
        for round_index in range(args.rounds):
            order = ["folder", "zip"] if round_index % 2 == 0 else ["zip", "folder"]
            for layout in order:
                target = Path(tmp) / f"{layout}-{round_index}" if layout == "folder" else Path(tmp) / f"zip-{round_index}.zip"
                started = time.perf_counter()
                (write_folder if layout == "folder" else write_zip)(target, encoded)
                os.sync()
                times[layout]["write"].append(time.perf_counter() - started)
                started = time.perf_counter()
                (read_folder if layout == "folder" else read_zip)(target, ids)
                times[layout]["read"].append(time.perf_counter() - started)
                sizes[layout] = on_disk(target)
    print(f"{args.images} label maps {args.size[0]}x{args.size[1]}, PNG {statistics.mean(map(len, encoded)) / 1024:.1f} KiB each on average")
    print(f"{'layout':8}{'on disk MiB':>13}{'apparent MiB':>14}{'files':>8}{'write s (min/med/max)':>26}{'read s (min/med/max)':>25}")
    for layout in ("folder", "zip"):
        allocated, apparent, files = sizes[layout]
        cells = ["/".join(f"{f(values):.2f}" for f in (min, statistics.median, max)) for values in times[layout].values()]
        print(f"{layout:8}{allocated / 2**20:>13.1f}{apparent / 2**20:>14.1f}{files:>8}{cells[0]:>26}{cells[1]:>25}")
    ratio = {key: sizes["zip"][i] / sizes["folder"][i] for i, key in enumerate(("on disk", "apparent", "files"))}
    write = statistics.median(times["zip"]["write"]) / statistics.median(times["folder"]["write"])
    read = statistics.median(times["zip"]["read"]) / statistics.median(times["folder"]["read"])
    print(f"zip / folder: on disk {ratio['on disk']:.3f}, apparent {ratio['apparent']:.3f}, files {ratio['files']:.4f}, "
          f"write {write:.2f}, read {read:.2f}")


if __name__ == "__main__":
    main()
