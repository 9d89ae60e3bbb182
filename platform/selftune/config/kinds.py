"""The registry of stage kinds: each kind's typed config and the function that runs it, together.

A stage module registers a kind by decorating its function::

    @register_stage(SupervisedStage)
    def run_supervised(job, ctx) -> dict: ...

``selftune/__init__.py`` imports every stage module, so the registry is full in any process that
imports ``selftune`` (a fresh Ray worker sees what the driver sees) and a pipeline YAML can be
validated without importing anything else first.

Artifacts and references. A kind declares the artifacts it ``produces`` (``MODEL``,
``PSEUDO_LABELS``, …); a config field that names an upstream stage is typed with ``Reference``
metadata saying which input role it fills and which artifact it reads. The loader resolves and
checks every such field generically (``config.loader.resolve_references``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from selftune.errors import ConfigError

# Artifacts a stage can produce, and the folder inside the stage's output folder that holds each.
MODEL = "model"  # a segmentation network: checkpoint/model.pt + model.json
AUX_MODEL = "aux_model"  # the auxiliary confidence network (auxnet): checkpoint/auxnet.pt + auxnet.json
SNAPSHOTS = "snapshots"  # K checkpoints saved during training (ST++): snapshots/<j>/
PSEUDO_LABELS = "pseudo_labels"  # one index PNG per labelled image, 255 = not kept
ARTIFACT_FOLDERS = {MODEL: "checkpoint", AUX_MODEL: "checkpoint", SNAPSHOTS: "snapshots", PSEUDO_LABELS: "pseudo_labels"}

CLOSEST = "closest"  # a reference left out means the closest earlier stage producing the artifact
NO_INPUT = "no_input"  # a reference left out means the stage reads no such input
REQUIRED = "required"  # the reference must be named


@dataclass(frozen=True)
class Reference:
    """Metadata of a config field that names an earlier stage: ``Annotated[str | None, Reference(...)]``.

    ``role``: the key of ``job.inputs`` the stage function reads; ``artifact``: what the named stage
    must produce; ``when_missing``: what ``None`` means (``CLOSEST``, ``NO_INPUT`` or ``REQUIRED``).
    """

    role: str
    artifact: str
    when_missing: str = CLOSEST

    def __post_init__(self) -> None:
        if self.artifact not in ARTIFACT_FOLDERS:
            raise ValueError(f"unknown artifact {self.artifact!r}; artifacts are {', '.join(ARTIFACT_FOLDERS)}")
        if self.when_missing not in (CLOSEST, NO_INPUT, REQUIRED):
            raise ValueError(f"when_missing must be {CLOSEST}, {NO_INPUT} or {REQUIRED}, got {self.when_missing!r}")


def reference_fields(config_class: type) -> dict[str, Reference]:
    """``{field name: Reference}`` of a stage config class, in declaration order."""
    return {
        name: meta
        for name, field in config_class.model_fields.items()
        for meta in field.metadata
        if isinstance(meta, Reference)
    }


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type  # a StageConfig subclass whose ``kind`` field is ``Literal[name]``
    run: Callable[..., dict[str, Any]]  # (job, ctx) -> summary, on every Ray Train worker


_KINDS: dict[str, StageKind] = {}


def register_stage(config: type) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register ``config`` (its ``kind`` default names the kind) with the decorated stage function."""
    name = config.model_fields["kind"].default
    if not isinstance(name, str):
        raise ValueError(f"{config.__name__}.kind must default to the kind's name")

    def decorate(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _KINDS:
            raise ValueError(f"stage kind {name!r} is registered twice")
        _KINDS[name] = StageKind(name, config, run)
        return run

    return decorate


def stage_kind(name: str, *, where: str = "kind") -> StageKind:
    """The registered kind ``name``; a miss is a ``ConfigError`` that lists the kinds there are."""
    if name not in _KINDS:
        raise ConfigError(f"{where}: unknown stage kind {name!r}; valid kinds are: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def registered_kinds() -> list[StageKind]:
    return [_KINDS[name] for name in sorted(_KINDS)]
