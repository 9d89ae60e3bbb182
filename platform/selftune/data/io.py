"""Reading images and index masks from disk, with one-line errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from selftune.data.index import IGNORE_INDEX
from selftune.errors import ConfigError, DataError

# PIL modes whose pixel values are class indices as they stand. "P" is a palette PNG (VOC): its
# array holds the palette *indices*, which are the classes; converting it to RGB would lose them.
_INDEX_MODES = {"L", "P", "1", "I", "I;16", "I;16B", "I;16L"}


DECODE_CACHE_ENV = "SELFTUNE_DECODE_CACHE_MB"  # per-process budget in MiB; 0 turns the cache off
DEFAULT_DECODE_CACHE_MB = 512
_decoded: dict[tuple[str, int, int], np.ndarray] = {}
_decoded_bytes = 0


def read_cached(path: str | Path, read: Callable[[], np.ndarray]) -> np.ndarray:
    """``read()``'s array for ``path``, decoded once per process while the cache has room.

    Decoding PNGs anew every epoch was the largest overhead of a small model's CPU training step
    (the quickstart took 200 s without this cache, 153 s with it, on 2 cores). The key holds the
    file's size and modification time, so a rewritten file is read again.
    Arrays are cached until the budget is spent (no eviction: with random access, any subset of a
    large dataset helps equally). The caller gets a copy it may edit in place.
    """
    global _decoded_bytes
    try:
        stat = os.stat(path)
    except OSError:
        return read()  # the reader raises the one-line DataError for a missing file
    key = (os.fspath(path), stat.st_mtime_ns, stat.st_size)
    array = _decoded.get(key)
    if array is None:
        array = read()
        if _decoded_bytes + array.nbytes > _budget_bytes():
            return array
        _decoded[key] = array
        _decoded_bytes += array.nbytes
    return array.copy()


def decode_cache_bytes() -> int:
    """Bytes of decoded arrays the process's cache holds now."""
    return _decoded_bytes


def _budget_bytes() -> float:
    value = os.environ.get(DECODE_CACHE_ENV, str(DEFAULT_DECODE_CACHE_MB))
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ConfigError(f"{DECODE_CACHE_ENV}={value!r} is not valid; give a size in MiB >= 0 (0 turns the cache off)")
    return megabytes * 2**20


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (a lazy open would defer truncation errors to later)."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # PIL reports corrupt and truncated files through several exception types.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {what} {path}: {reason}") from None
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array (grey, RGBA and palette images are converted)."""
    path = Path(path)
    with _open(path, "image") as image:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.array(rgb, dtype=np.uint8)  # a writable copy: callers may edit it in place


def read_mask(path: str | Path, num_classes: int, label_map: np.ndarray | None = None) -> np.ndarray:
    """Read a single-channel index mask as an (H, W) uint8 array of class ids in 0..C-1 or 255.

    ``label_map`` (256 uint8 entries) is applied to the raw values first, e.g. Cityscapes
    labelId -> trainId. Any other value raises ``DataError``, so a mask saved with the wrong
    encoding fails loudly instead of training on garbage.
    """
    path = Path(path)
    with _open(path, "mask") as image:
        if image.mode not in _INDEX_MODES:
            raise DataError(
                f"mask {path} has PIL mode {image.mode!r}; masks must be single-channel class indices "
                "(8-bit grey 'L' or palette 'P' PNG), not colour images"
            )
        raw = np.array(image)
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DataError(
                f"mask {path} holds values up to {int(raw.max())}; valid values are 0..{num_classes - 1} "
                f"or {IGNORE_INDEX} (ignore)"
            )
        raw = raw.astype(np.uint8)  # 16-bit or bilevel masks whose values fit in a byte
    mask = raw if label_map is None else label_map[raw]
    _check_values(mask, num_classes, path)
    return mask


def _check_values(mask: np.ndarray, num_classes: int, path: Path) -> None:
    # A 256-bin histogram is one vectorised pass, and gives the offending values for the message.
    counts = np.bincount(mask.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[num_classes:]) + num_classes
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(
            f"mask {path} holds values {shown}; valid values are 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)"
        )
