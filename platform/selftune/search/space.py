"""Search spaces: which pipeline values a search samples, and how, read from YAML.

A space names a pipeline file and maps dotted pipeline paths to parameters::

    pipeline: ../pipelines/quickstart.yaml
    set: {stages.self_train.epochs: 4}            # fixed overrides for every trial
    objective: {metric: val/miou, mode: max}      # default: the last training stage's val/miou
    params:
      stages.pseudo_label.threshold: {type: float, low: 0.6, high: 0.99}
      stages.self_train.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      stages.self_train.gamma: {type: categorical, choices: [0, 2, 9]}
      stages.dst.schedules.label.alpha:            # a conditional group: a schedule family
        type: conditional
        key: shape
        branches:
          linear: {start: {type: float, low: 0.1, high: 0.5}, end: 1.0}
          step: {start: 0.2, milestones: [2, 4], factor: {type: float, low: 1.2, high: 2.0}}

Optuna names the sampled values by their dotted path; a conditional group samples
``<path>.<key>`` and then only its chosen branch's ``<path>.<branch>.<name>`` values, and the
pipeline receives ``{key: branch, **branch values}`` at ``path``.

Each parameter is validated by building its Optuna distribution (Optuna's own rules: ``low <=
high``, ``log`` needs ``low > 0`` and no step, ...), ``points_to_evaluate`` are checked against
those distributions, and every path is checked against the pipeline, before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator

from selftune.config import PipelineConfig, flatten, pipeline_to_dict, read_yaml, validate_pipeline
from selftune.config.paths import deep_copy, get_dotted, set_dotted
from selftune.errors import ConfigError, SelftuneError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Distribution(_Strict):
    """A parameter whose rules are Optuna's: validation builds its Optuna distribution, so a space
    that loads is one Optuna can sample (its ValueError becomes the one-line error)."""

    @model_validator(mode="after")
    def _check(self):
        try:
            self.distribution()
        except ValueError as error:
            raise ValueError(f"not a valid Optuna distribution: {error}") from None
        return self

    def distribution(self) -> BaseDistribution:
        raise NotImplementedError


class FloatParam(_Distribution):
    type: Literal["float"]
    low: FiniteFloat  # Optuna does not refuse inf/nan bounds; pydantic's finite type does
    high: FiniteFloat
    log: bool = False
    step: FiniteFloat | None = None
    mutable: bool | None = None  # pbt/pb2: perturbed between rounds (default: when it is a per-round value)

    def distribution(self) -> FloatDistribution:
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)


class IntParam(_Distribution):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1
    mutable: bool | None = None  # pbt/pb2: perturbed between rounds (default: when it is a per-round value)

    def distribution(self) -> IntDistribution:
        return IntDistribution(self.low, self.high, log=self.log, step=self.step)


class CategoricalParam(_Distribution):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)
    mutable: bool | None = None  # pbt/pb2: perturbed between rounds (default: when it is a per-round value)

    def distribution(self) -> CategoricalDistribution:
        return CategoricalDistribution(self.choices)


Leaf = Union[FloatParam, IntParam, CategoricalParam]


class ConditionalParam(_Strict):
    """A value that is a mapping whose keys depend on one choice (e.g. a schedule's ``shape``)."""

    type: Literal["conditional"]
    key: str  # the mapping key the chosen branch name goes to (e.g. "shape"); not "on": YAML reads that as true
    branches: dict[str, dict[str, Any]] = Field(min_length=1)


class Objective(_Strict):
    # "select/miou": the last training stage's mIoU on the selection images (data.selection), never
    # the reported val/miou; or "<stage>/select/miou", "<stage>/pseudo_label/miou", ...
    metric: str = "select/miou"
    mode: Literal["max", "min"] = "max"


class SearcherConfig(_Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(4, ge=1)  # TPE: random trials before the model is used
    points_to_evaluate: list[dict[str, Any]] = []  # e.g. the paper's published defaults, by param name


class SchedulerConfig(_Strict):
    name: Literal["none", "asha", "pbt", "pb2"] = "asha"
    # asha: stops weak trials at stage boundaries
    grace_period: int = Field(1, ge=1)  # rungs (stages that measure the objective) a trial always runs before it can be stopped
    reduction_factor: int = Field(2, ge=2)
    # pbt, pb2: a population over the rounds of a curriculum (selftune.search.pbt)
    population: int = 4  # the trials (budget.num_samples does not apply)
    perturbation_interval: int = Field(1, ge=1)  # rounds between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # the bottom fraction copies the top one
    resample_probability: float = Field(0.25, ge=0, le=1)  # pbt: redraw a value instead of perturbing it
    burn_in: int = Field(0, ge=0)  # rounds before the first perturbation
    seed: int = 0  # of the explore step's random draws


class BudgetConfig(_Strict):
    num_samples: int = Field(8, ge=1)
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the cluster's CPUs/GPUs allow
    time_limit_s: float | None = Field(None, gt=0)
    # Restarts of a trial that Ray lost (its actor or a stage's worker killed, its node gone); it goes
    # on from its last finished stage. A trial's own error (e.g. diverged training) is not retried.
    trial_retries: int = Field(2, ge=0)
    # A size (``20G``, ``500M``): the stage outputs this search computed stay under it as trials end
    # (see selftune.search.disk_budget). None: no limit.
    disk: str | None = None

    @field_validator("disk")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None:
            from selftune.runner.store import parse_size

            try:
                parse_size(value, "budget.disk")
            except SelftuneError as error:
                raise ValueError(str(error).removeprefix(f"budget.disk {value}: ")) from None
        return value

    @property
    def disk_bytes(self) -> int | None:
        from selftune.runner.store import parse_size

        return None if self.disk is None else parse_size(self.disk, "budget.disk")


class SearchSpaceConfig(_Strict):
    name: str | None = None  # default: the file's stem
    pipeline: str
    set: dict[str, Any] = {}
    objective: Objective = Objective()
    params: dict[str, Any] = Field(min_length=1)
    searcher: SearcherConfig = SearcherConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    budget: BudgetConfig = BudgetConfig()
    stage_cache: bool = True  # false: every trial computes every stage (for comparisons)


class SearchSpace:
    """A validated space: the pipeline it searches, its parameters, and how to apply a sample."""

    def __init__(self, config: SearchSpaceConfig, *, source: str, pipeline_path: Path, raw_pipeline: dict[str, Any]):
        self.config = config
        self.source = source
        self.pipeline_path = pipeline_path
        self.raw_pipeline = raw_pipeline  # with the space's `set:` (and --set) applied
        self.name = config.name or Path(source).stem
        self.params: dict[str, Leaf | ConditionalParam] = {
            path: _parse_param(spec, f"{source}: params.{path}") for path, spec in config.params.items()
        }

    # -- sampling ----------------------------------------------------------------------------

    def suggest(self, trial) -> None:
        """Optuna define-by-run: sample every parameter on ``trial`` (an ``optuna.Trial``)."""
        for path, param in self.params.items():
            if isinstance(param, ConditionalParam):
                branch = trial.suggest_categorical(f"{path}.{param.key}", list(param.branches))
                for key, value in param.branches[branch].items():
                    if _is_leaf(value):
                        _suggest_leaf(trial, f"{path}.{branch}.{key}", value)
            else:
                _suggest_leaf(trial, path, param)

    def grid(self) -> dict[str, list[Any]]:
        """Optuna's ``GridSampler`` space; only for spaces of categorical and int parameters."""
        grid: dict[str, list[Any]] = {}
        for path, param in self.params.items():
            if isinstance(param, CategoricalParam):
                grid[path] = list(param.choices)
            elif isinstance(param, IntParam) and not param.log:
                grid[path] = list(range(param.low, param.high + 1, param.step))
            elif isinstance(param, FloatParam) and param.step is not None and not param.log:
                count = int(round((param.high - param.low) / param.step))
                grid[path] = [param.low + i * param.step for i in range(count + 1)]
            else:
                raise ConfigError(
                    f"{self.source}: params.{path}: the grid searcher needs categorical, int or stepped float "
                    "parameters (conditional groups and continuous floats have no grid)"
                )
        return grid

    # -- applying ----------------------------------------------------------------------------

    def values_for(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Pipeline path -> value for an Optuna sample (param name -> sampled value)."""
        values: dict[str, Any] = {}
        for path, param in self.params.items():
            if isinstance(param, ConditionalParam):
                branch = sample[f"{path}.{param.key}"]
                value = {param.key: branch}
                for key, item in param.branches[branch].items():
                    value[key] = sample[f"{path}.{branch}.{key}"] if _is_leaf(item) else deep_copy(item)
                values[path] = value
            else:
                values[path] = sample[path]
        return values

    def pipeline_for(self, sample: dict[str, Any], overrides: dict[str, Any] | None = None) -> PipelineConfig:
        """The validated pipeline with ``sample`` (and extra ``overrides``) applied."""
        raw = deep_copy(self.raw_pipeline)
        for path, value in {**self.values_for(sample), **(overrides or {})}.items():
            set_dotted(raw, path, value, self.source)
        return validate_pipeline(raw, source=f"{self.source} (pipeline {self.pipeline_path})")

    @property
    def trial_budget(self) -> int:
        """Trials the search runs: a PBT population, else ``budget.num_samples``."""
        scheduler = self.config.scheduler
        return scheduler.population if scheduler.name in ("pbt", "pb2") else self.config.budget.num_samples

    def stage_count(self) -> int:
        return len(self.pipeline_for(self.default_sample()).stages)

    def default_sample(self) -> dict[str, Any]:
        """One valid sample: each parameter's lower bound or first choice (for validation)."""
        return self.corner_samples()[0]

    def corner_samples(self) -> list[dict[str, Any]]:
        """Samples that together touch every bound, choice and branch at least once."""
        per_param = [_extremes_at(path, param) for path, param in self.params.items()]
        widest = max(len(options) for options in per_param)
        samples = []
        for i in range(widest):
            sample: dict[str, Any] = {}
            for options in per_param:
                sample.update(options[min(i, len(options) - 1)])
            samples.append(sample)
        return samples

    def param_names(self) -> list[str]:
        """Every name Optuna may sample, conditional branches included."""
        return list(self.distributions())

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna's distribution of every name it may sample (a group's branch is a categorical)."""
        found: dict[str, BaseDistribution] = {}
        for path, param in self.params.items():
            if isinstance(param, ConditionalParam):
                found[f"{path}.{param.key}"] = CategoricalDistribution(list(param.branches))
                for branch, items in param.branches.items():
                    found.update({f"{path}.{branch}.{key}": item.distribution() for key, item in items.items()
                                  if _is_leaf(item)})
            else:
                found[path] = param.distribution()
        return found

    def completed(self, point: dict[str, Any]) -> dict[str, Any]:
        """A partial sample (a point to evaluate) with each missing value at a bound or first
        choice, of the branch the point chose: a full sample to check the pipeline with."""
        sample: dict[str, Any] = {}
        for path, param in self.params.items():
            options = _extremes_at(path, param)
            fitting = [option for option in options
                       if all(point.get(name, value) == value for name, value in option.items()
                              if isinstance(param, ConditionalParam) and name == f"{path}.{param.key}")]
            sample.update((fitting or options)[0])
        return {**sample, **point}


def _extremes_at(path: str, param: Leaf | ConditionalParam) -> list[dict[str, Any]]:
    if isinstance(param, ConditionalParam):
        out = []
        for branch, items in param.branches.items():
            leaf_options = {f"{path}.{branch}.{key}": _leaf_bounds(item) for key, item in items.items() if _is_leaf(item)}
            width = max([len(v) for v in leaf_options.values()] or [1])
            for i in range(width):
                sample = {f"{path}.{param.key}": branch}
                sample.update({name: values[min(i, len(values) - 1)] for name, values in leaf_options.items()})
                out.append(sample)
        return out
    return [{path: value} for value in _leaf_bounds(param)]


def _leaf_bounds(param: Leaf) -> list[Any]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    return [param.low, param.high]


def _suggest_leaf(trial, name: str, param: Leaf) -> Any:
    if isinstance(param, FloatParam):
        return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return trial.suggest_int(name, param.low, param.high, log=param.log, step=param.step)
    return trial.suggest_categorical(name, param.choices)


_LEAVES = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}


def _parse_param(spec: Any, where: str) -> Leaf | ConditionalParam:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: a parameter is a mapping with type: float | int | categorical | conditional")
    kind = spec["type"]
    if kind == "conditional":
        group = _validated(ConditionalParam, spec, where)
        for branch, items in group.branches.items():
            if not isinstance(items, dict):
                raise ConfigError(f"{where}.branches.{branch}: must be a mapping of key -> value or parameter")
            if group.key in items:
                raise ConfigError(f"{where}.branches.{branch}.{group.key}: set by the branch name; remove it")
            group.branches[branch] = {
                key: _parse_leaf(value, f"{where}.branches.{branch}.{key}") if _is_param(value) else value
                for key, value in items.items()
            }
        return group
    return _parse_leaf(spec, where)


def _is_param(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value


def _parse_leaf(spec: dict[str, Any], where: str) -> Leaf:
    model = _LEAVES.get(spec.get("type"))
    if model is None:
        raise ConfigError(f"{where}.type: unknown parameter type {spec.get('type')!r}; valid: categorical, conditional, float, int")
    return _validated(model, spec, where)


def _validated(model: type[BaseModel], spec: dict[str, Any], where: str):
    try:
        return model.model_validate(spec)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].replace("Value error, ", "")
        if problem["type"] == "extra_forbidden":
            message = f"unknown key; valid keys are: {', '.join(model.model_fields)}"
        return _raise(f"{where}{'.' + key if key else ''}: {message}")


def _raise(message: str):
    raise ConfigError(message)


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Read, validate and check a search space against its pipeline; errors name file and key."""
    from selftune.config import parse_override

    path = Path(path)
    raw = read_yaml(path)
    source = str(path)
    for text in overrides or []:
        # budget.num_samples=4 sets the space; any other key (stages.x.epochs=2) the pipeline.
        key, value = parse_override(text, source)
        if key.split(".")[0] in SearchSpaceConfig.model_fields:
            set_dotted(raw, key, value, source)
        else:
            raw.setdefault("set", {})
            raw["set"] = {**(raw["set"] or {}), key: value}
    try:
        config = SearchSpaceConfig.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            valid = ", ".join(SearchSpaceConfig.model_fields)
            raise ConfigError(f"{source}: {key}: unknown key; valid top-level keys are: {valid}") from None
        if problem["type"] == "missing":
            raise ConfigError(f"{source}: {key}: required key is missing") from None
        raise ConfigError(f"{source}: {key}: {problem['msg']}, got {problem.get('input')!r}") from None
    pipeline_path = (path.parent / config.pipeline).resolve()
    raw_pipeline = read_yaml(pipeline_path)
    for key, value in config.set.items():
        set_dotted(raw_pipeline, key, value, f"{source}: set")
    space = SearchSpace(config, source=source, pipeline_path=pipeline_path, raw_pipeline=raw_pipeline)
    check_paths(space)
    return space


def check_paths(space: SearchSpace) -> None:
    """Every parameter path must exist in the pipeline (as written, or as a schema default), and
    every bound, choice and branch must give a valid pipeline."""
    from selftune.search import pbt

    base = validate_pipeline(space.raw_pipeline, source=f"{space.source} (pipeline {space.pipeline_path})")
    resolved = pipeline_to_dict(base)
    known = set(flatten(resolved))
    population = pbt.is_population_search(space)
    for path, param in space.params.items():
        if not population and getattr(param, "mutable", None) is not None:
            raise ConfigError(f"{space.source}: params.{path}.mutable: only scheduler.name pbt or pb2 changes values "
                              "between rounds; remove it")
        if population and pbt.round_value(path, space.raw_pipeline):
            continue  # a per-round value of a group's stage: the samples below check its key
        try:
            get_dotted(space.raw_pipeline, path, str(space.pipeline_path))
            continue
        except ConfigError:
            pass
        if path in known or any(key.startswith(path + ".") for key in known):
            continue
        raise ConfigError(f"{space.source}: params.{path}: no such value in the pipeline {space.pipeline_path}")
    for sample in space.corner_samples():  # every choice of a categorical model.name is one corner
        try:
            space.pipeline_for(sample)  # validates it, model.name included
        except ConfigError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in sample.items())
            raise ConfigError(f"{space.source}: the sample {{{shown}}} gives an invalid pipeline: {error}") from None
    for i, point in enumerate(space.config.searcher.points_to_evaluate):
        check_point(space, point, f"{space.source}: searcher.points_to_evaluate.{i}")
    if population:
        pbt.check_population_space(space)
        for sample in space.corner_samples():  # the explicit per-round lists the trials will run
            space.pipeline_for(sample, overrides=pbt.realised_overrides(space, sample, {}))


def check_point(space: SearchSpace, point: dict[str, Any], where: str) -> None:
    """A point to evaluate must name sampled parameters, lie in their distributions (as Optuna
    decides for a fixed parameter) and, completed to a full sample, give a valid pipeline."""
    distributions = space.distributions()
    for name, value in point.items():
        distribution = distributions.get(name)
        if distribution is None:
            raise ConfigError(f"{where}: unknown parameter {name!r}; valid: {', '.join(distributions)}")
        if not _contains(distribution, value):
            raise ConfigError(f"{where}.{name}: {value!r} is outside the searched space; valid: {_describe(distribution)}")
    try:
        space.pipeline_for(space.completed(point))
    except ConfigError as error:
        raise ConfigError(f"{where}: gives an invalid pipeline: {error}") from None


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    """Optuna's own test of a fixed (enqueued) value: ``to_internal_repr`` refuses a choice not
    listed or a non-number, ``_contains`` a number off the bounds or the step grid."""
    if isinstance(value, bool) and not isinstance(distribution, CategoricalDistribution):
        return False  # YAML true is not the number 1
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def _describe(distribution: BaseDistribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(repr(choice) for choice in distribution.choices)
    step = f" in steps of {distribution.step}" if distribution.step not in (None, 1) else ""
    log = " (log)" if distribution.log else ""
    return f"{distribution.low}..{distribution.high}{step}{log}"


def _is_leaf(value: Any) -> bool:
    return isinstance(value, (FloatParam, IntParam, CategoricalParam))
