"""Stage kinds. Each is a function ``(job, ctx) -> summary`` registered with its config class by
``selftune.config.register_stage``; a method's stage kinds live in ``stages/<method>.py`` (their
math in ``selftune.methods.<method>``). Importing this package imports every module in it, and
``import selftune`` imports this package, so every process sees the same kinds."""

import importlib
import pkgutil

from selftune.stages.job import CHECKPOINT, PSEUDO_LABELS_FOLDER, RESULT, SUMMARY, StageJob, artifact_path

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CHECKPOINT", "PSEUDO_LABELS_FOLDER", "RESULT", "SUMMARY", "StageJob", "artifact_path"]
