"""Curricula over rounds: a ``rounds`` group repeats its stages, with values following schedules.

In YAML::

    - name: dst
      kind: rounds
      rounds: 5
      schedules:                       # <inner stage>: {<key>: a schedule over the rounds}
        label: {alpha: {shape: linear, start: 0.2, end: 1.0}}
      stages:
        - {name: label, kind: class_balanced_label}
        - {name: train, kind: self_train, init_from: previous}

expands, before validation, into the flat stages ``dst-r1-label, dst-r1-train, dst-r2-label, …``
with ``alpha`` = 0.2, 0.4, … Inside a round, a reference to an inner stage name (``pseudo_labels:
label``) means that round's stage; references left out default to the closest earlier stage as
everywhere else, so round r's labelling uses round r-1's model. Because expansion happens after
``--set`` overrides, the search can tune ``stages.dst.rounds`` and the schedules' start, end and
shape like any other value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from selftune.config.kinds import registered_kinds
from selftune.config.paths import set_dotted
from selftune.errors import ConfigError
from selftune.schedules import schedule_value, validate_schedule

GROUP_KIND = "rounds"
GROUP_KEYS = {"name", "kind", "rounds", "schedules", "stages"}
# Schema errors that mean "out of range": for a monotone schedule they blame one key of it.
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


@dataclass(frozen=True)
class ScheduledValue:
    """A value a schedule gave one round's stage, and the key the user wrote it under, so that a
    schema error names ``stages.dst.schedules.label.alpha.end`` rather than ``stages.dst-r4-label.alpha``."""

    path: str  # stages.<group>.schedules.<inner stage>.<key>
    spec: Any
    round: int  # 1-based
    rounds: int

    def describe(self, problem: Mapping[str, Any]) -> str:
        """One line for the schema's complaint ``problem`` (a pydantic error) about this value."""
        rule = problem["msg"].replace("Value error, ", "")
        culprit = self._culprit() if problem["type"] in _BOUND_ERRORS else None
        scheduled = f"round {self.round} of {self.rounds} would get {problem.get('input')!r}"
        if culprit is None:
            return f"{self.path}: {scheduled}: {rule}"
        key, value = culprit
        return f"{self.path}{key}: {rule}, got {value!r} ({scheduled})"

    def _culprit(self) -> tuple[str, Any] | None:
        """The schedule key (suffix, its value) a range error at this round comes from. Every
        shape is monotone, so the first round out of range blames the start unless round 1 was fine."""
        spec = self.spec
        if not isinstance(spec, Mapping):
            return "", spec
        shape, first = spec["shape"], self.round == 1
        if shape == "constant":
            return ".value", spec["value"]
        if shape == "list":
            return f".values[{self.round - 1}]", spec["values"][self.round - 1]
        if first:
            return ".start", spec["start"]
        if shape == "step":
            key = "factor" if "factor" in spec else "increment"
            return f".{key}", spec[key]
        return ".end", spec["end"]


def expand_rounds(stages: list[Any], source: str) -> tuple[list[Any], dict[str, dict[str, ScheduledValue]]]:
    """Replace every ``kind: rounds`` group by its stages repeated ``rounds`` times. Also returns,
    per expanded stage name, the dotted keys a schedule set and where the user wrote them."""
    expanded: list[Any] = []
    scheduled: dict[str, dict[str, ScheduledValue]] = {}
    for stage in stages:
        if isinstance(stage, dict) and stage.get("kind") == GROUP_KIND:
            for round_stage, origins in _expand_group(stage, source):
                expanded.append(round_stage)
                scheduled[round_stage["name"]] = origins
        else:
            expanded.append(stage)
    return expanded, scheduled


def written_under(name: Any, group: str | None, round_index: int | None) -> str:
    """The dotted key a stage is written under: ``stages.dst.stages.label`` for the round stage
    ``dst-r2-label``, ``stages.<name>`` for a stage outside any group."""
    if not group:
        return f"stages.{name}"
    return f"stages.{group}.stages.{str(name).removeprefix(f'{group}-r{round_index}-')}"


def _expand_group(group: dict[str, Any], source: str) -> list[tuple[dict[str, Any], dict[str, ScheduledValue]]]:
    name = group.get("name")
    where = f"stages.{name}"
    unknown = set(group) - GROUP_KEYS
    if unknown:
        raise ConfigError(f"{source}: {where}.{sorted(unknown)[0]}: unknown key; valid keys here are: {', '.join(sorted(GROUP_KEYS))}")
    rounds = group.get("rounds")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"{source}: {where}.rounds: must be a whole number >= 1, got {rounds!r}")
    inner = group.get("stages")
    if not isinstance(inner, list) or not inner or not all(isinstance(s, dict) and "name" in s for s in inner):
        raise ConfigError(f"{source}: {where}.stages: must be a non-empty list of stages with names")
    inner_names = [s["name"] for s in inner]
    schedules = _schedule_leaves(group.get("schedules") or {}, f"{where}.schedules", source)
    for key, spec in schedules.items():
        if key.split(".")[0] not in inner_names:
            raise ConfigError(f"{source}: {where}.schedules.{key}: {key.split('.')[0]!r} is not a stage of this group; stages: {', '.join(inner_names)}")
        validate_schedule(spec, rounds, where=f"{source}: {where}.schedules.{key}")
    out = []
    for round_index in range(1, rounds + 1):
        for stage in inner:
            out.append(_round_stage(stage, name, round_index, rounds, inner_names, schedules, source))
    return out


def _schedule_leaves(node: Any, where: str, source: str, prefix: str = "") -> dict[str, Any]:
    """``{label: {alpha: {shape: ...}}}`` -> ``{"label.alpha": {shape: ...}}``: a schedule is a
    mapping with a ``shape`` key; everything above it is the path to the scheduled value."""
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: {where}{'.' + prefix if prefix else ''}: expected a mapping of stage -> key -> schedule")
    if "shape" in node:
        if "." not in prefix:
            raise ConfigError(f"{source}: {where}.{prefix}: name the scheduled key inside the stage, e.g. {prefix or 'label'}.alpha")
        return {prefix: node}
    leaves: dict[str, Any] = {}
    for key, child in node.items():
        leaves.update(_schedule_leaves(child, where, source, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def _round_stage(stage, group, round_index, rounds, inner_names, schedules, source):
    copy = {key: _copy(value) for key, value in stage.items()}
    prefix = f"{group}-r{round_index}-"
    copy.update(name=prefix + stage["name"], group=group, round=round_index)
    origins: dict[str, ScheduledValue] = {}
    for key, spec in schedules.items():
        inner, _, dotted = key.partition(".")
        if inner == stage["name"]:
            set_dotted(copy, dotted, schedule_value(spec, round_index - 1, rounds), source)
            origins[dotted] = ScheduledValue(f"stages.{group}.schedules.{key}", spec, round_index, rounds)
    for field in _reference_field_names(stage.get("kind")):
        if copy.get(field) in inner_names:
            copy[field] = prefix + copy[field]
    return copy, origins


def _reference_field_names(kind: Any) -> list[str]:
    """The kind's reference fields; none for an unknown kind (its validation reports it)."""
    known = {k.name: k.config for k in registered_kinds()}
    return list(known[kind].reference_fields()) if kind in known else []


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
