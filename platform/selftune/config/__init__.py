"""Pipeline configuration: typed schema, YAML loading, ``--set`` overrides."""

from selftune.config.paths import get_dotted, set_dotted
from selftune.config.loader import (
    flatten,
    load_pipeline,
    parse_override,
    pipeline_to_dict,
    read_yaml,
    validate_pipeline,
)
from selftune.config.kinds import (
    ARTIFACT_FOLDERS,
    AUX_MODEL,
    MODEL,
    PSEUDO_LABELS,
    SNAPSHOTS,
    Reference,
    StageKind,
    register_stage,
    registered_kinds,
    stage_kind,
)
from selftune.config.schema import (
    PREVIOUS,
    ClassWeighting,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PipelineConfig,
    PseudoLabelStage,
    PseudoLabelledTraining,
    ResourcesConfig,
    SelfTrainStage,
    StageConfig,
    SupervisedStage,
    TrainingStageConfig,
)

__all__ = [
    "ARTIFACT_FOLDERS", "AUX_MODEL", "MODEL", "PREVIOUS", "PSEUDO_LABELS", "SNAPSHOTS", "Reference", "StageKind",
    "register_stage", "registered_kinds", "stage_kind", "DataConfig", "ModelConfig", "OptimizerConfig", "PipelineConfig", "PseudoLabelStage",
    "PseudoLabelledTraining", "ClassWeighting",
    "ResourcesConfig", "SelfTrainStage", "StageConfig", "SupervisedStage", "TrainingStageConfig",
    "flatten", "get_dotted", "load_pipeline", "parse_override", "pipeline_to_dict", "read_yaml",
    "set_dotted", "validate_pipeline",
]
