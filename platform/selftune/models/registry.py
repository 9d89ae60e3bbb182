"""Model registry: ``@register_model("name")`` on a builder ``(num_classes, **options) -> SegmentationNetwork``.

Filled at import of ``selftune.models`` so a fresh Ray worker sees what the driver sees.
"""

from __future__ import annotations

from typing import Any, Callable

from selftune.errors import ConfigError
from selftune.models.network import SegmentationNetwork

ModelBuilder = Callable[..., SegmentationNetwork]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    return sorted(_MODELS)


def check_model_name(name: str, source: str) -> None:
    """At load, before any run exists: ``model.name`` must be a registered model."""
    if name not in _MODELS:
        raise ConfigError(f"{source}: model.name: unknown model {name!r}; registered models are: "
                          f"{', '.join(available_models())}")


def build_model(name: str, num_classes: int, **options: Any) -> SegmentationNetwork:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models are: {', '.join(available_models())}")
    return _MODELS[name](num_classes=num_classes, **options)
