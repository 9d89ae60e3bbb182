"""Stage kinds. Each is a function ``(job, ctx) -> summary`` registered by kind with
``@register_stage``; a method's stage kinds live in ``stages/<method>.py`` (their math in
``selftune.methods.<method>``). Importing this package imports every module in it, so a fresh Ray
worker registers exactly what the driver did."""

import importlib
import pkgutil

from selftune.stages.job import (
    ARTIFACT_OF_ROLE,
    CHECKPOINT,
    PSEUDO_LABELS,
    SUMMARY,
    StageJob,
    register_stage,
    registered_stage_kinds,
    stage_function,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ARTIFACT_OF_ROLE", "CHECKPOINT", "PSEUDO_LABELS", "SUMMARY", "StageJob", "register_stage",
    "registered_stage_kinds", "stage_function",
]
