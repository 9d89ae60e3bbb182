"""Sample ids as they appear in list and split files, normalised to the form a dataset uses.

Published lists write the same image in several ways: a bare id (``2007_000033``), an image/mask
path pair (``JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png``, DeepLab's
``/JPEGImages/...``), or Cityscapes paths (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``).
An id keeps as many trailing path components as the dataset's ids have: one for VOC-style ids,
two (``<city>/<name>``) for Cityscapes.

An id names files under the dataset root (and selftune writes pseudo labels under its output
folder by id), so a line whose path climbs out (``..``) or whose id would be absolute is refused,
naming the file and line: a split file must not make selftune read or write elsewhere.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from selftune.errors import DataError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_NAME_SUFFIXES = ("_leftImg8bit",)


class UnsafeId(ValueError):
    """A list-file entry whose id would leave the dataset root."""


def normalise_id(entry: str, depth: int = 1) -> str:
    """The id in one list-file line: first field, extension and ``_leftImg8bit`` stripped, last
    ``depth`` path components kept (``depth=0``: all). Raises ``UnsafeId`` for a path with a
    ``..`` component, or one whose kept components start at the filesystem root."""
    path = PurePosixPath(entry.split()[0].replace("\\", "/"))
    if ".." in path.parts:
        raise UnsafeId("climbs out of the dataset root with '..'")
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        path = path.with_suffix("")
    parts = path.parts[-depth:] if depth > 0 else path.parts
    if not parts:
        raise UnsafeId("names no file")
    if path.is_absolute() and parts[0] == path.anchor:  # DeepLab's "/JPEGImages/x.jpg" keeps only "x"
        raise UnsafeId("is an absolute path; ids are relative to the dataset root")
    name = parts[-1]
    for suffix in _NAME_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "/".join((*parts[:-1], name))


def id_depth(ids: list[str]) -> int:
    """How many path components the dataset's ids have (1 for ``2007_000033``, 2 for ``city/name``)."""
    return max((len(PurePosixPath(i).parts) for i in ids), default=1)


def read_id_file(path: Path, depth: int = 1, *, keep_repeats: bool = False) -> list[str]:
    """Ids listed in a text file, one per line; blank lines and ``#`` comments are skipped,
    repeats keep their first position (or, with ``keep_repeats``, all stay, for callers that
    reject them)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from None
    ids = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        try:
            ids.append(normalise_id(entry, depth))
        except UnsafeId as unsafe:
            raise DataError(f"split file {path} line {number}: {entry.split()[0]!r} {unsafe}; refused") from None
    return ids if keep_repeats else list(dict.fromkeys(ids))
