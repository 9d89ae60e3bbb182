"""Typed pipeline configuration.

A pipeline YAML is validated against these models (``extra="forbid"``, so a misspelt key is an
error, not a silent default). Each stage is validated against the config class its ``kind``
registered (``selftune.config.kinds``); methods add their own kinds in ``selftune/stages/``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selftune.config.kinds import CLOSEST, MODEL, NO_INPUT, PSEUDO_LABELS, Reference
from selftune.config.kinds import reference_fields as _reference_fields

Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    """Which dataset, which labelled subset, and how batches are made."""

    dataset: str = "synthetic"  # a layout registered in selftune.data: synthetic, folder, voc, cityscapes
    root: str | None = None  # None: the built-in synthetic dataset's cache folder
    options: dict[str, Any] = {}  # passed to the layout reader, e.g. {num_classes: 5} for a folder without classes.txt
    labelled: int | float | str = 12  # a count (100), a fraction (1/8, 0.125) or a split file
    # Where model selection happens. "val": on the reported set (the papers' protocol; the numbers
    # it chooses are optimistic). A count (20), a fraction (1/10) or a split file: a draw of val
    # images that choose best epochs (select/miou) and are removed from the reported val set.
    selection: int | float | str = "val"
    selection_seed: int = 0  # the selection draw's seed: the same reported set for every pipeline seed
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
    # Worker groups only: how often Ray Train restarts a stage whose worker (or node) died, from its
    # last epoch's checkpoint. Local mode has none (a search retries the stage's task from scratch).
    max_failures: int = Field(2, ge=0, strict=True)


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "poly"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    # The network's head (ASPP / classifier, a multi-head branch) at this multiple of lr, as
    # DeepLab-family training runs its new layers at 10x the pretrained backbone's rate.
    head_lr_mult: float = Field(1.0, gt=0)


class StageConfig(StrictModel):
    """Fields every stage kind has. ``group``/``round`` are filled when a ``rounds`` group is
    expanded (see ``selftune.config.rounds``)."""

    produces: ClassVar[frozenset[str]] = frozenset()  # the artifacts this kind writes (config.kinds)
    needs_unlabelled: ClassVar[bool] = False  # refused at load when the split leaves no unlabelled image

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: str
    group: str | None = None
    round: int | None = Field(None, ge=1)

    @classmethod
    def reference_fields(cls) -> dict[str, Reference]:
        """The fields that name an earlier stage (renamed per round when a group is expanded)."""
        return _reference_fields(cls)

    def upstream(self) -> dict[str, str]:
        """Inputs this stage reads from earlier stages: ``{role: stage name}`` (after resolution)."""
        return {
            reference.role: getattr(self, name)
            for name, reference in self.reference_fields().items()
            if getattr(self, name) is not None
        }


PREVIOUS = "previous"  # init_from: previous = the closest earlier training stage

# Reference fields shared by several kinds.
InitFrom = Annotated[str | None, Reference("init", MODEL, when_missing=NO_INPUT)]
ModelFrom = Annotated[str | None, Reference("model", MODEL, when_missing=CLOSEST)]
PseudoLabelsFrom = Annotated[str | None, Reference("pseudo_labels", PSEUDO_LABELS, when_missing=CLOSEST)]


class TrainingStageConfig(StageConfig):
    """Fields of every stage that trains a segmentation network."""

    produces: ClassVar[frozenset[str]] = frozenset({MODEL})

    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the stage's main training set
    batch_size: int = Field(16, ge=1)  # labelled images per step
    optimizer: OptimizerConfig = OptimizerConfig()
    # Fine-tune from this earlier stage's best checkpoint ("previous": the closest); None: fresh weights.
    init_from: InitFrom = None


class ClassWeighting(StrictModel):
    """Class-weighted cross-entropy (seed 004 §4.2 trains with ENet's weights ``1 / ln(c + p_class)``,
    c = 1.1, computed once from the labelled masks); ``none``: plain cross-entropy."""

    class_weights: Literal["none", "enet"] = "none"
    class_weight_c: float = Field(1.1, gt=1.0)


class SupervisedStage(TrainingStageConfig, ClassWeighting):
    """Cross-entropy on the labelled images only."""

    kind: Literal["supervised"] = "supervised"


class PseudoLabelStage(StageConfig):
    """A trained model labels the unlabelled images: argmax, then pixels below ``threshold`` become 255."""

    produces: ClassVar[frozenset[str]] = frozenset({PSEUDO_LABELS})
    needs_unlabelled: ClassVar[bool] = True

    kind: Literal["pseudo_label"] = "pseudo_label"
    model_from: ModelFrom = None  # None: the closest earlier training stage
    threshold: Fraction01 | None = None  # keep pixels whose max softmax probability is >= threshold
    unused_threshold: ClassVar[str | None] = None  # a kind that keeps pixels otherwise says how, here

    @field_validator("threshold")
    @classmethod
    def _threshold_is_used(cls, value: float | None) -> float | None:
        if value is not None and cls.unused_threshold:
            raise ValueError(f"is not used by {cls.model_fields['kind'].default}; {cls.unused_threshold}")
        return value


class PseudoLabelledTraining(TrainingStageConfig):
    """Fields of every stage that trains on labelled images beside a pseudo-label folder."""

    needs_unlabelled: ClassVar[bool] = True

    pseudo_labels: PseudoLabelsFrom = None  # None: the closest earlier pseudo-labelling stage
    unlabelled_batch_size: int = Field(16, ge=1)  # pseudo-labelled images per step
    pseudo_weight: float = Field(1.0, ge=0)


class SelfTrainStage(PseudoLabelledTraining, ClassWeighting):
    """Labelled CE + ``pseudo_weight`` * CE on pseudo-labelled images (pixels labelled 255 ignored);
    each term is the mean over its own kept pixels."""

    kind: Literal["self_train"] = "self_train"


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
