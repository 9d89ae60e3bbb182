"""benchmarks/pseudo_label_storage.py compares like with like: both layouts hold the same PNG
bytes and read back the same labels; its disk count is allocated blocks, not apparent size."""

from __future__ import annotations

import importlib.util
import io
import zipfile

import numpy as np
from PIL import Image

from support import REPO

spec = importlib.util.spec_from_file_location("pseudo_label_storage", REPO / "benchmarks" / "pseudo_label_storage.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_both_layouts_hold_the_same_labels(tmp_path):
    labels = [np.full((6, 5), value, dtype=np.uint8) for value in (0, 3, 255)]
    encoded = [bench.png_bytes(label) for label in labels]
    bench.write_folder(tmp_path / "folder", encoded)
    bench.write_zip(tmp_path / "labels.zip", encoded)
    with zipfile.ZipFile(tmp_path / "labels.zip") as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())  # members read as they are
        for index, label in enumerate(labels):
            from_zip = np.asarray(Image.open(io.BytesIO(archive.read(f"{index:06d}.png"))))
            from_folder = np.asarray(Image.open(tmp_path / "folder" / f"{index:06d}.png"))
            assert np.array_equal(from_zip, label) and np.array_equal(from_folder, label)


def test_disk_use_counts_allocated_blocks(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "one").write_bytes(b"x")
    allocated, apparent, files = bench.on_disk(tmp_path / "f")
    assert (apparent, files) == (1, 1) and allocated >= apparent  # a one-byte file still takes a block
