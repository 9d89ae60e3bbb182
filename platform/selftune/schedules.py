"""Curricula: a value that changes over rounds or epochs, described by a plain dict.

A spec lives in YAML and in search spaces as data, e.g. DST-CBC's labelling ratio over 5 rounds::

    alpha: {shape: linear, start: 0.2, end: 1.0}      # 0.2, 0.4, 0.6, 0.8, 1.0

``schedule_value(spec, index, total)`` reads point ``index`` (0-based) of a schedule that runs
over ``total`` points. Shapes and their keys:

* ``constant``: ``value``. A bare number is accepted as a constant too.
* ``linear``: ``start``, ``end`` — index 0 is start, index total-1 is end, evenly spaced between.
* ``cosine``: ``start``, ``end`` — half a cosine from start (index 0) to end (index total-1):
  ``end + (start - end) * (1 + cos(pi * index / (total - 1))) / 2``.
* ``step``: ``start``, ``milestones`` (strictly increasing indices >= 1, each < total) and exactly
  one of ``factor`` (multiply at each milestone reached) or ``increment`` (add at each milestone
  reached): value = ``start * factor ** m`` or ``start + increment * m`` with m the number of
  milestones <= index.
* ``list``: ``values`` — one number per point, exactly ``total`` of them.

With ``total == 1`` linear and cosine give ``start``. Every error is a one-line
``selftune.errors.ConfigError`` naming the key (prefixed by ``where``, e.g. the dotted config
path) and what is valid.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from selftune.errors import ConfigError

__all__ = ["SHAPES", "schedule_value", "schedule_values", "validate_schedule"]

# shape -> (required keys, optional keys)
SHAPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "constant": (frozenset({"value"}), frozenset()),
    "linear": (frozenset({"start", "end"}), frozenset()),
    "cosine": (frozenset({"start", "end"}), frozenset()),
    "step": (frozenset({"start", "milestones"}), frozenset({"factor", "increment"})),
    "list": (frozenset({"values"}), frozenset()),
}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, but got {value!r}")
    return float(value)


def _check_total(total: int, where: str) -> None:
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError(f"{where}: a schedule runs over a whole number >= 1 of points, but got total={total!r}")


def validate_schedule(spec: Any, total: int | None = None, *, where: str = "schedule") -> None:
    """Raise ``ConfigError`` unless ``spec`` is a valid schedule (for ``total`` points, if given)."""
    if total is not None:
        _check_total(total, where)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        _number(spec, where)
        return
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where}: a schedule is a number or a mapping with a 'shape' key, but got {type(spec).__name__} {spec!r}"
        )
    shape = spec.get("shape")
    if shape not in SHAPES:
        got = "no shape" if "shape" not in spec else f"shape {shape!r}"
        raise ConfigError(f"{where}.shape: {got} is not a schedule shape; valid shapes: {', '.join(sorted(SHAPES))}")
    required, optional = SHAPES[shape]
    keys = set(spec) - {"shape"}
    unknown, missing = keys - required - optional, required - keys
    allowed = ", ".join(sorted(required | optional))
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}: not a key of a {shape} schedule; its keys are shape, {allowed}")
    if missing:
        raise ConfigError(f"{where}.{sorted(missing)[0]}: required by a {shape} schedule (keys: shape, {allowed})")
    for key in sorted(keys - {"milestones", "values"}):
        _number(spec[key], f"{where}.{key}")
    if shape == "step":
        if ("factor" in spec) == ("increment" in spec):
            raise ConfigError(f"{where}: a step schedule needs exactly one of 'factor' (multiply) or 'increment' (add)")
        _check_milestones(spec["milestones"], total, f"{where}.milestones")
    if shape == "list":
        values = spec["values"]
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}.values: must be a non-empty list of numbers, but got {values!r}")
        for i, value in enumerate(values):
            _number(value, f"{where}.values[{i}]")
        if total is not None and len(values) != total:
            raise ConfigError(
                f"{where}.values: has {len(values)} values but the schedule runs over {total} points; "
                f"give exactly {total}"
            )


def _check_milestones(milestones: Any, total: int | None, where: str) -> None:
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (list, tuple)):
        raise ConfigError(f"{where}: must be a list of increasing indices >= 1, but got {milestones!r}")
    previous = 0
    for i, milestone in enumerate(milestones):
        if isinstance(milestone, bool) or not isinstance(milestone, int) or milestone <= previous:
            raise ConfigError(
                f"{where}[{i}]: milestones must be whole numbers >= 1 in strictly increasing order, "
                f"but got {milestones!r}"
            )
        if total is not None and milestone >= total:
            raise ConfigError(
                f"{where}[{i}]: milestone {milestone} is never reached by a schedule over {total} points "
                f"(indices 0..{total - 1})"
            )
        previous = milestone


def schedule_value(spec: Any, index: int, total: int, *, where: str = "schedule") -> float:
    """Point ``index`` (0-based) of the schedule ``spec`` over ``total`` points, as a float.

    Validates ``spec`` first (``ConfigError``); an ``index`` outside ``0..total-1`` is a
    ``ValueError`` (a caller's bug, not a config error).
    """
    validate_schedule(spec, total, where=where)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < total:
        raise ValueError(f"{where}: index must be a whole number in 0..{total - 1}, but got {index!r}")
    if not isinstance(spec, Mapping):
        return float(spec)
    shape = spec["shape"]
    if shape == "constant":
        return float(spec["value"])
    if shape == "list":
        return float(spec["values"][index])
    if shape == "step":
        reached = sum(1 for milestone in spec["milestones"] if milestone <= index)
        if "factor" in spec:
            return float(spec["start"]) * float(spec["factor"]) ** reached
        return float(spec["start"]) + float(spec["increment"]) * reached
    start, end = float(spec["start"]), float(spec["end"])
    if total == 1:
        return start
    progress = index / (total - 1)  # 0 at the first point, 1 at the last
    if shape == "linear":
        return start * (1.0 - progress) + end * progress  # exact at both ends
    # cosine
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def schedule_values(spec: Any, total: int, *, where: str = "schedule") -> list[float]:
    """All ``total`` points of the schedule: ``[schedule_value(spec, i, total) for i in range(total)]``."""
    validate_schedule(spec, total, where=where)
    return [schedule_value(spec, i, total, where=where) for i in range(total)]
