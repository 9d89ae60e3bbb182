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
from selftune.config.schema import (
    STAGE_CONFIGS,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PipelineConfig,
    PseudoLabelStage,
    ResourcesConfig,
    SelfTrainStage,
    StageConfig,
    SupervisedStage,
    TrainingStageConfig,
    register_stage_config,
)

__all__ = [
    "STAGE_CONFIGS", "DataConfig", "ModelConfig", "OptimizerConfig", "PipelineConfig", "PseudoLabelStage",
    "ResourcesConfig", "SelfTrainStage", "StageConfig", "SupervisedStage", "TrainingStageConfig",
    "flatten", "get_dotted", "load_pipeline", "parse_override", "pipeline_to_dict", "read_yaml",
    "register_stage_config", "set_dotted", "validate_pipeline",
]
