"""Load a pipeline YAML, apply ``--set a.b=c`` overrides, validate, resolve stage references.

Every problem becomes one ``ConfigError`` line: ``<file>: <dotted.key>: <rule>, got <value>``.
Stages are addressed by name in dotted keys (``stages.supervised.epochs``), or by position
(``stages.0.epochs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from selftune.config.kinds import NO_INPUT, REQUIRED, Reference, stage_kind
from selftune.config.paths import deep_copy, set_dotted
from selftune.config.rounds import ScheduledValue, expand_rounds, written_under
from selftune.config.schema import PREVIOUS, PipelineConfig, StageConfig
from selftune.errors import ConfigError
from selftune.models.registry import check_model_name


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read, override, validate and resolve the pipeline file at ``path``."""
    return validate_pipeline(read_yaml(path), source=str(path), overrides=overrides)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def validate_pipeline(raw: dict[str, Any], *, source: str, overrides: Iterable[str] = ()) -> PipelineConfig:
    raw = deep_copy(raw)
    for text in overrides:
        key, value = parse_override(text, source)
        set_dotted(raw, key, value, source)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{source}: stages: must be a non-empty list of stages")
    stages, scheduled = expand_rounds(stages, source)
    raw["stages"] = [_validate_stage(stage, i, source, scheduled) for i, stage in enumerate(stages)]
    try:
        pipeline = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source, raw)) from None
    check_model_name(pipeline.model.name, source)
    return resolve_references(pipeline, source)


def parse_override(text: str, source: str = "--set") -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML (numbers, null, lists, 1/8 stays a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. stages.supervised.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _validate_stage(raw_stage: Any, index: int, source: str, scheduled: dict[str, dict[str, ScheduledValue]]) -> StageConfig:
    if not isinstance(raw_stage, dict):
        raise ConfigError(f"{source}: stages.{index}: must be a mapping with name and kind")
    label = str(raw_stage.get("name", index))
    written = written_under(label, raw_stage.get("group"), raw_stage.get("round"))  # what the user wrote
    config = stage_kind(raw_stage.get("kind"), where=f"{source}: {written}.kind").config
    try:
        return config.model_validate(raw_stage)
    except ValidationError as error:
        problem = error.errors()[0]
        origin = scheduled.get(label, {}).get(".".join(str(part) for part in problem["loc"]))
        if origin is not None:  # the user wrote a schedule, not this round's stage
            raise ConfigError(f"{source}: {origin.describe(problem)}") from None
        raise ConfigError(_describe(error, source, raw_stage, prefix=written)) from None


def _describe(error: ValidationError, source: str, raw: Any, prefix: str = "") -> str:
    """The first validation problem as one line naming the dotted key, the rule and the value."""
    problem = error.errors()[0]
    loc = [str(part) for part in problem["loc"]]
    key = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
    if problem["type"] == "extra_forbidden":
        valid = _valid_keys(raw, loc, prefix)
        return f"{source}: {key}: unknown key; valid keys here are: {valid}"
    if problem["type"] == "missing":
        return f"{source}: {key}: required key is missing"
    message = problem["msg"].replace("Value error, ", "")
    return f"{source}: {key}: {message}, got {problem.get('input')!r}"


def _valid_keys(raw: Any, loc: list[str], prefix: str) -> str:
    model: type[BaseModel] | None = PipelineConfig
    if prefix.startswith("stages.") and isinstance(raw, dict):
        model = stage_kind(raw.get("kind")).config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ", ".join(sorted(model.model_fields)) if model else "(see the documentation)"


def resolve_references(pipeline: PipelineConfig, source: str) -> PipelineConfig:
    """Check that stage names are unique and that every reference field names an earlier stage
    producing the artifact it reads; fill ``None`` defaults with the closest such stage, so the
    resolved config says exactly which artifact each stage reads."""
    every_name = [stage.name for stage in pipeline.stages]
    seen: list[StageConfig] = []
    for stage in pipeline.stages:
        if any(other.name == stage.name for other in seen):
            raise ConfigError(f"{source}: stages.{stage.name}.name: stage names must be unique")
        written = written_under(stage.name, stage.group, stage.round)  # the key the user wrote
        updates = {
            field: _resolve(seen, every_name, getattr(stage, field), reference, f"{source}: {written}.{field}")
            for field, reference in stage.reference_fields().items()
        }
        seen.append(stage.model_copy(update=updates))
    return pipeline.model_copy(update={"stages": seen})


def _resolve(seen: list[StageConfig], every_name: list[str], name: str | None, reference: Reference, where: str) -> str | None:
    producers = [stage.name for stage in seen if reference.artifact in stage.produces]
    if name is None and reference.when_missing == NO_INPUT:
        return None
    if name is None and reference.when_missing == REQUIRED:
        raise ConfigError(f"{where}: required: name an earlier stage that produces {reference.artifact}; valid: {_names(producers)}")
    if name is None or name == PREVIOUS:
        if not producers:
            raise ConfigError(f"{where}: needs an earlier stage that produces {reference.artifact}, and there is none")
        return producers[-1]
    if name not in producers:
        if name in every_name and name not in [stage.name for stage in seen]:
            raise ConfigError(f"{where}: {name!r} comes later in the pipeline; a stage reads only earlier stages: {_names(producers)}")
        if name not in every_name:
            raise ConfigError(f"{where}: {name!r} is not a stage of this pipeline; stages that produce {reference.artifact} before it: {_names(producers)}")
        raise ConfigError(f"{where}: {name!r} is not an earlier stage that produces {reference.artifact}; valid: {_names(producers)}")
    return name


def _names(names: list[str]) -> str:
    return ", ".join(names) or "(none)"


def pipeline_to_dict(pipeline: PipelineConfig) -> dict[str, Any]:
    """The resolved pipeline as plain data (what is logged and written as YAML)."""
    data = pipeline.model_dump(mode="json")
    data["stages"] = [stage.model_dump(mode="json") for stage in pipeline.stages]
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of named mappings use the names."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "name" in x for x in data):
        items = ((x["name"], x) for x in data)
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
