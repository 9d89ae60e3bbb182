"""Which training images are labelled: a count, a fraction, or a published split file.

Counts and fractions draw a seeded permutation of the *sorted* train ids and take its first n, so
for one seed a smaller labelled set is a prefix of a larger one (nested splits, as in DST-CBC and
CutMix-Seg), and the result does not depend on the order the layout lists ids in.

A fraction f of N ids gives ``n = ceil(N * f)`` (f read exactly, "1/8" as 1/8). Rounding up
reproduces the published sizes: VOC trainaug (10 582) 1/16, 1/8, 1/4, 1/2 -> 662, 1323, 2646, 5291;
Cityscapes (2 975) 1/30, 1/16, 1/8, 1/4, 1/2 -> 100, 186, 372, 744, 1488. (DST-CBC's own files are
one smaller for some ratios, e.g. 1322 and 371; pass those files, or counts, to reproduce them.)

Split files accepted (relative paths are resolved against the dataset root):

* text, one entry per line: a bare id (``2007_000033``, ``aachen/aachen_000000_000019``; DST-CBC),
  or ``image [mask]`` paths (``JPEGImages/x.jpg SegmentationClass/x.png``,
  ``leftImg8bit/train/<city>/<name>_leftImg8bit.png gtFine/...``; U2PL, ST++, UniMatch). Only the
  first field is used, reduced to the dataset's id form.
* ``.pkl`` / ``.npy`` holding a permutation of train indices (CutMix-Seg's ``split_0.pkl``): the
  labelled set is its first n entries, so the count is part of the spec: ``"split_0.pkl:106"``.
  Indices refer to ``train_ids`` in the order given (the layout's order: the list file's for VOC).

Images without masks: ``candidates`` names the train ids that may be labelled (those that have a
mask; default: all of them). Counts and fractions then draw from the candidates only, and a
fraction is of the *candidate* count (``"1/8"`` of 40 masked images among 1 000 is 5); a split or
index file may select candidates only. Every train id not selected, masked or not, is unlabelled.
When every id is a candidate the result is exactly what it is without ``candidates``.

``split_selection`` splits the *val* ids the same way into a selection set (what picks the best
epoch and what a search optimises) and the reported set (the rest of val, only measured), so that
the number reported is not the number selected on; ``"val"`` keeps the papers' protocol (both are
all of val). A count or fraction is the same seeded, nested draw; a fraction f of N val ids is
``ceil(N * f)`` images, like the labelled split, and must leave at least one image to report.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from selftune.data._ids import id_depth, read_id_file
from selftune.errors import ConfigError, DataError

_COUNT = re.compile(r"^[+-]?\d+$")
_RATIO = re.compile(r"^\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*$")
_DECIMAL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")
_INDEX_FILE = re.compile(r"^(?P<path>.+\.(?:pkl|npy)):(?P<count>.*)$", re.IGNORECASE)
_VALID = (
    "a count (100), a fraction in (0, 1] (1/8, 0.125), a split file, or an index file with a count (split_0.pkl:106)"
)


def split_labelled(
    train_ids: Sequence[str],
    spec: int | float | str | Path,
    *,
    seed: int,
    root: Path | None = None,
    candidates: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split ``train_ids`` into (labelled, unlabelled) according to ``spec``.

    ``candidates`` are the ids eligible to be labelled (the train images that have masks; ``None``:
    all). A count or fraction draws from them only, a fraction being of the candidate count; a
    split file that names a non-candidate is a ``DataError``.

    Labelled ids come in selection order (permutation or file order); unlabelled ids are the
    remaining train ids in their given order, candidates or not.
    """
    ids = list(train_ids)
    if len(set(ids)) != len(ids):
        raise DataError("train ids are not unique; a dataset must list every training image once")
    pool = _Pool(ids, _eligible(ids, candidates))
    labelled = _select(pool, spec, seed, root)
    chosen = set(labelled)
    return labelled, [i for i in ids if i not in chosen]


class _Pool:
    """The train ids and those of them that may be labelled (``eligible``, in train order)."""

    def __init__(self, ids: list[str], eligible: list[str]) -> None:
        self.ids = ids
        self.eligible = eligible
        self.restricted = len(eligible) < len(ids)  # some train images have no mask

    def check_count(self, n: int, spec: object) -> int:
        size = len(self.eligible)
        if 1 <= n <= size:
            return n
        if not self.restricted:
            raise ConfigError(
                f"labelled split {spec!r} asks for {n} images; the count must be in 1..{size} (the train set)"
            )
        if size == 0:
            raise ConfigError(
                f"labelled split {spec!r} asks for {n} images, but none of the {len(self.ids)} train images has a mask"
            )
        raise ConfigError(
            f"labelled split {spec!r} asks for {n} images, but only {size} of the {len(self.ids)} train images "
            f"have masks; the count must be in 1..{size}"
        )

    def check_eligible(self, labelled: list[str], source: str) -> list[str]:
        if self.restricted:
            eligible = set(self.eligible)
            unmasked = [i for i in labelled if i not in eligible]
            if unmasked:
                shown = ", ".join(repr(i) for i in unmasked[:3]) + (", ..." if len(unmasked) > 3 else "")
                ids = "id" if len(unmasked) == 1 else "ids"
                raise DataError(
                    f"{source} names {len(unmasked)} {ids} without a mask (only images with masks can be "
                    f"labelled): {shown}"
                )
        return labelled


def _eligible(ids: list[str], candidates: Sequence[str] | None) -> list[str]:
    if candidates is None:
        return ids
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of ids, not a single string")
    chosen = set(candidates)
    unknown = chosen - set(ids)
    if unknown:
        raise ValueError(f"candidates must be train ids; {len(unknown)} are not, e.g. {min(unknown)!r}")
    return [i for i in ids if i in chosen]


def _select(pool: _Pool, spec: int | float | str | Path, seed: int, root: Path | None) -> list[str]:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    count = _requested_count(spec, pool)
    if count is not None:
        return _first(pool.eligible, count, seed)
    text = str(spec).strip()
    if index_file := _INDEX_FILE.match(text):
        count_text = index_file["count"].strip()
        if not _COUNT.match(count_text):
            raise ConfigError(f"labelled split {spec!r}: the count after ':' must be an integer, e.g. split_0.pkl:106")
        path = _resolve(index_file["path"], root, spec)
        labelled = _from_index_file(pool.ids, path, pool.check_count(int(count_text), spec))
        return pool.check_eligible(labelled, f"index file {path}")
    if text.lower().endswith((".pkl", ".npy")):
        raise ConfigError(f"labelled split {spec!r} is an index file; add the labelled count, e.g. {text}:106")
    path = _resolve(text, root, spec)
    return pool.check_eligible(_from_id_file(pool.ids, path), f"split file {path}")


def _requested_count(spec: object, pool: _Pool) -> int | None:
    """The labelled count a numeric spec asks for; ``None`` when ``spec`` names a file."""
    if isinstance(spec, bool):
        raise ConfigError(f"labelled split {spec!r} is not valid; use {_VALID}")
    if isinstance(spec, numbers.Integral):
        return pool.check_count(int(spec), spec)
    if isinstance(spec, numbers.Real):
        if not math.isfinite(spec):
            raise ConfigError(f"labelled split {spec!r} is not valid; use {_VALID}")
        return _fraction_count(Fraction(float(spec)).limit_denominator(10**6), pool, spec)
    if not isinstance(spec, str):
        raise ConfigError(f"labelled split {spec!r} has type {type(spec).__name__}; use {_VALID}")
    text = spec.strip()
    if _COUNT.match(text):
        return pool.check_count(int(text), spec)
    if ratio := _RATIO.match(text):
        numerator, denominator = int(ratio[1]), int(ratio[2])
        if denominator == 0:
            raise ConfigError(f"labelled split {spec!r} divides by zero; use {_VALID}")
        return _fraction_count(Fraction(numerator, denominator), pool, spec)
    if _DECIMAL.match(text):
        return _fraction_count(Fraction(text).limit_denominator(10**6), pool, spec)
    return None


def _fraction_count(fraction: Fraction, pool: _Pool, spec: object) -> int:
    """``ceil(f * number of candidates)``: a fraction is of the images that can be labelled."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"labelled split {spec!r} is a fraction outside (0, 1]; use e.g. 1/8 or 0.125")
    n = math.ceil(len(pool.eligible) * fraction)  # exact: Fraction arithmetic, no float round-off
    if n == 0:  # only when there is nothing to draw from
        reason = f"none of the {len(pool.ids)} train images has a mask" if pool.ids else "the train set is empty"
        raise ConfigError(f"labelled split {spec!r} selects no images: {reason}")
    return n


def _first(ids: list[str], n: int, seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(ids))
    ordered = sorted(ids)
    return [ordered[k] for k in order[:n]]


def _resolve(text: str, root: Path | None, spec: object) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.is_file():
        raise ConfigError(
            f"labelled split {spec!r} is not a number and no split file {path} exists "
            f"(relative paths are resolved against the dataset root); use {_VALID}"
        )
    return path


def _from_id_file(ids: list[str], path: Path) -> list[str]:
    listed = read_id_file(path, depth=id_depth(ids))
    if not listed:
        raise DataError(f"split file {path} lists no ids")
    known = set(ids)
    unknown = [i for i in listed if i not in known]
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(f"split file {path} lists {len(unknown)} ids not in the train set: {shown}")
    return listed


def _from_index_file(ids: list[str], path: Path, n: int) -> list[str]:
    order = _load_indices(path)
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise DataError(
            f"index file {path} must hold a 1-D array of integer train indices, got {order.dtype} {order.shape}"
        )
    if n > len(order):
        raise ConfigError(f"labelled count {n} exceeds the {len(order)} indices in {path}")
    head = order[:n]
    if head.min() < 0 or head.max() >= len(ids) or len(np.unique(head)) != n:
        raise DataError(f"index file {path} must hold distinct indices in 0..{len(ids) - 1} (the train set)")
    return [ids[k] for k in head]


def _load_indices(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.asarray(np.load(path, allow_pickle=False))
        with path.open("rb") as handle:
            return np.asarray(_NumpyOnlyUnpickler(handle).load())
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot read index file {path}: {exc}") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles lists and numpy arrays only: a split file must not be able to run code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> type:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}; expected a numpy array or a list of ints")


SELECTION_KEY = "data.selection"
_SELECTION_VALID = (
    "'val' (select on the reported set, the papers' protocol), a count (20), a fraction in (0, 1) (1/10, 0.1), "
    "or a split file of val ids"
)


def split_selection(
    val_ids: Sequence[str], spec: int | float | str | Path, *, seed: int, root: Path | None = None,
) -> tuple[list[str], list[str]]:
    """Split ``val_ids`` into (selection, reported) according to ``data.selection`` = ``spec``.

    ``"val"``: both are every val id (selecting on the reported set: optimistic). A count or a
    fraction: a seeded draw of that many val ids (the draw of ``split_labelled``: nested for one
    seed, independent of the order ids come in), removed from the reported set. A path (relative
    to the dataset root ``root``): a text file of val ids, one per line, in the forms split files
    take. Selection ids come in draw or file order, reported ids in val order.
    """
    ids = list(val_ids)
    if len(set(ids)) != len(ids):
        raise DataError("val ids are not unique; a dataset must list every val image once")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str) and spec.strip().lower() == "val":
        return list(ids), list(ids)
    count = _selection_count(spec, len(ids))
    selection = _first(ids, count, seed) if count is not None else _selection_file(ids, spec, root)
    chosen = set(selection)
    return selection, [i for i in ids if i not in chosen]


def _selection_count(spec: object, size: int) -> int | None:
    """How many val images a numeric ``spec`` selects; ``None`` when it names a file."""
    if isinstance(spec, bool) or not isinstance(spec, (numbers.Real, str)):
        raise ConfigError(f"{SELECTION_KEY} = {spec!r} is not valid; use {_SELECTION_VALID}")
    if isinstance(spec, numbers.Integral):
        return _check_selection_count(int(spec), size, spec)
    if isinstance(spec, numbers.Real):
        if not math.isfinite(spec):
            raise ConfigError(f"{SELECTION_KEY} = {spec!r} is not valid; use {_SELECTION_VALID}")
        return _selection_fraction(Fraction(float(spec)).limit_denominator(10**6), size, spec)
    text = spec.strip()
    if _COUNT.match(text):
        return _check_selection_count(int(text), size, spec)
    if ratio := _RATIO.match(text):
        if int(ratio[2]) == 0:
            raise ConfigError(f"{SELECTION_KEY} = {spec!r} divides by zero; use {_SELECTION_VALID}")
        return _selection_fraction(Fraction(int(ratio[1]), int(ratio[2])), size, spec)
    if _DECIMAL.match(text):
        return _selection_fraction(Fraction(text).limit_denominator(10**6), size, spec)
    return None


def _selection_fraction(fraction: Fraction, size: int, spec: object) -> int:
    if not 0 < fraction < 1:
        raise ConfigError(
            f"{SELECTION_KEY} = {spec!r} is a fraction outside (0, 1); use e.g. 1/10 or 0.1 "
            "(or 'val' to select on the whole val set)"
        )
    return _check_selection_count(math.ceil(size * fraction), size, spec)  # exact: Fraction arithmetic


def _check_selection_count(n: int, size: int, spec: object) -> int:
    """The selection must hold an image and leave at least one val image to report."""
    if 1 <= n < size:
        return n
    if size <= 1:
        raise ConfigError(
            f"{SELECTION_KEY} = {spec!r}: the val set has {size} image(s), too few to split off a selection set; use 'val'"
        )
    raise ConfigError(
        f"{SELECTION_KEY} = {spec!r} selects {n} of the {size} val images; the count must be in 1..{size - 1} "
        "(the rest is the reported val set), or use 'val'"
    )


def _selection_file(ids: list[str], spec: object, root: Path | None) -> list[str]:
    path = Path(str(spec).strip()).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.is_file():
        raise ConfigError(
            f"{SELECTION_KEY} = {spec!r} is not a number and no split file {path} exists "
            f"(relative paths are resolved against the dataset root); use {_SELECTION_VALID}"
        )
    listed = read_id_file(path, depth=id_depth(ids), keep_repeats=True)
    if not listed:
        raise ConfigError(f"{SELECTION_KEY}: split file {path} lists no ids")
    repeated = [i for i, count in Counter(listed).items() if count > 1]
    if repeated:
        raise ConfigError(f"{SELECTION_KEY}: split file {path} lists {_some(repeated)} more than once")
    known = set(ids)
    unknown = [i for i in listed if i not in known]
    if unknown:
        raise ConfigError(f"{SELECTION_KEY}: split file {path} lists {len(unknown)} id(s) not in the val set: {_some(unknown)}")
    if len(listed) == len(ids):
        raise ConfigError(
            f"{SELECTION_KEY}: split file {path} lists all {len(ids)} val images, leaving none to report; "
            "list fewer, or use 'val'"
        )
    return listed


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
