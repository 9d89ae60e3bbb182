"""Stage kinds. Each is a function ``(job, ctx) -> summary`` registered by kind; importing this
package registers the built-in ones."""

from selftune.stages import pseudo_label, self_train, supervised  # noqa: F401  (registration)
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

__all__ = [
    "ARTIFACT_OF_ROLE", "CHECKPOINT", "PSEUDO_LABELS", "SUMMARY", "StageJob", "register_stage",
    "registered_stage_kinds", "stage_function",
]
