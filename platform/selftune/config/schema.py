"""Typed pipeline configuration.

A pipeline YAML is validated against these models (``extra="forbid"``, so a misspelt key is an
error, not a silent default). Stage kinds are a discriminated union on ``kind``. Methods add their
own stage kinds by registering a model with ``register_stage_config``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    """Which dataset, which labelled subset, and how batches are made."""

    dataset: str = "synthetic"  # a layout registered in selftune.data: synthetic, folder, voc, cityscapes
    root: str | None = None  # None: the built-in synthetic dataset's cache folder
    options: dict[str, Any] = {}  # passed to the layout reader, e.g. {num_classes: 5} for a folder without classes.txt
    labelled: int | float | str = 12  # a count (100), a fraction (1/8, 0.125) or a split file
    crop_size: int = Field(64, ge=8)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    eval_batch_size: int = Field(32, ge=1)
    loader_workers: int = Field(0, ge=0)  # DataLoader worker processes per training worker

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError("must satisfy 0 < low <= high")
        return value


class ModelConfig(StrictModel):
    name: str = "small_segnet"  # a name registered in selftune.models
    options: dict[str, Any] = {}


class ResourcesConfig(StrictModel):
    """How each stage's Ray Train run is scaled."""

    workers: int = Field(0, ge=0)  # 0: Ray Train local mode (in-process); N: N DDP workers
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast dtype on GPU; CPU always runs fp32


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "poly"] = "poly"
    poly_power: float = Field(0.9, gt=0)


class StageConfig(StrictModel):
    """Fields every stage kind has. ``group``/``round`` are filled when a ``rounds`` group is
    expanded (see ``selftune.config.rounds``)."""

    # Fields that name an earlier stage (renamed per round when a group is expanded).
    reference_fields: ClassVar[tuple[str, ...]] = ()

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: str
    group: str | None = None
    round: int | None = Field(None, ge=1)

    def upstream(self) -> dict[str, str]:
        """Inputs this stage reads from earlier stages: ``{role: stage name}``."""
        return {}


class TrainingStageConfig(StageConfig):
    """Fields of every stage that trains a model."""

    reference_fields: ClassVar[tuple[str, ...]] = ("init_from",)

    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the stage's main training set
    batch_size: int = Field(16, ge=1)  # labelled images per step
    optimizer: OptimizerConfig = OptimizerConfig()
    init_from: str | None = None  # fine-tune from this earlier stage's best checkpoint ("previous": the closest); None: fresh

    def upstream(self) -> dict[str, str]:
        return {"init": self.init_from} if self.init_from else {}


class SupervisedStage(TrainingStageConfig):
    """Cross-entropy on the labelled images only."""

    kind: Literal["supervised"] = "supervised"


class PseudoLabelStage(StageConfig):
    """A trained model labels the unlabelled images: argmax, then pixels below ``threshold`` become 255."""

    reference_fields: ClassVar[tuple[str, ...]] = ("model_from",)

    kind: Literal["pseudo_label"] = "pseudo_label"
    model_from: str | None = None  # None: the closest earlier training stage
    threshold: Fraction01 | None = None  # keep pixels whose max softmax probability is >= threshold

    def upstream(self) -> dict[str, str]:
        return {"model": self.model_from} if self.model_from else {}


class SelfTrainStage(TrainingStageConfig):
    """Labelled CE + ``pseudo_weight`` * CE on pseudo-labelled images (pixels labelled 255 ignored)."""

    reference_fields: ClassVar[tuple[str, ...]] = ("init_from", "pseudo_labels")

    kind: Literal["self_train"] = "self_train"
    pseudo_labels: str | None = None  # None: the closest earlier pseudo_label stage
    unlabelled_batch_size: int = Field(16, ge=1)  # pseudo-labelled images per step
    pseudo_weight: float = Field(1.0, ge=0)
    # DST-CBC eqs. 1-2: pseudo-labelled pixels weigh p_cur[label]^gamma (labelled pixels 1), the
    # sum normalised by all non-ignored pixels of the batch; 0: plain CE per term (the default).
    gamma: float = Field(0.0, ge=0)

    def upstream(self) -> dict[str, str]:
        inputs = super().upstream()
        if self.pseudo_labels:
            inputs["pseudo_labels"] = self.pseudo_labels
        return inputs


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "supervised": SupervisedStage,
    "pseudo_label": PseudoLabelStage,
    "self_train": SelfTrainStage,
}


def register_stage_config(model: type[StageConfig]) -> type[StageConfig]:
    """Add a stage kind; its ``kind`` field must be a ``Literal`` of one string."""
    kind = model.model_fields["kind"].default
    if kind in STAGE_CONFIGS:
        raise ValueError(f"stage kind {kind!r} is registered twice")
    STAGE_CONFIGS[kind] = model
    return model


class PipelineConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # also the default MLflow experiment
    description: str = ""
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    resources: ResourcesConfig = ResourcesConfig()
    stages: list[Any] = Field(min_length=1)  # validated per kind in selftune.config.loader
    final: dict[str, Any] = {}  # dotted overrides applied by a tuned final run (e.g. more epochs)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def stage_index(self, name: str) -> int:
        return [stage.name for stage in self.stages].index(name)


StageUnion = Union[SupervisedStage, PseudoLabelStage, SelfTrainStage]
