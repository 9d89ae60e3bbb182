"""Population-based training (PBT, PB2) over the rounds of a curriculum.

A population of trials runs a pipeline's ``rounds`` group in lock-step (Tune's synchronous PBT).
Every ``perturbation_interval`` rounds the weakest trials take the state of the strongest and a
perturbed copy of their values for the rounds that follow. Three things make this fit selftune:

* **Per-round values.** A mutable parameter is a value of a stage *inside* a rounds group
  (``stages.dst.stages.train.gamma``). It applies to the rounds that run after it was set, so a
  trial's realised values are one list per parameter (``alpha = 0.2, 0.2, 0.45, ...``): the rounds
  it has run keep their values, the rest take the current one. That list is what the pipeline
  gets, as an explicit schedule (``stages.dst.schedules.train.gamma: {shape: list, values: [...]}``).
* **Exploit through the stage cache, never by copying weights.** The checkpoint a trial reports
  after each stage holds only its realised values and stage count. A clone that Tune restores
  from a donor's checkpoint therefore rebuilds exactly the donor's stages for the rounds done
  (same values, same keys: cache hits), and its own new values from the next round on.
* **Values that cannot change mid-run** (the supervised stage's, the model's) are drawn once for
  the initial population and kept; a clone takes its donor's (its stages were computed with them).

Optuna draws the initial population (the space's distributions, seeded); Tune's PBT evolves it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.config import PipelineConfig
from selftune.config.rounds import GROUP_KIND
from selftune.errors import ConfigError

POPULATION_SCHEDULERS = ("pbt", "pb2")
ROUND = "round"  # PBT's time attribute: rounds of the searched group completed
PB2_EXTRA = 'pip install -e ".[pb2]"'


@dataclass(frozen=True)
class RoundValue:
    """A mutable parameter: ``stages.<group>.stages.<stage>.<key>``."""

    path: str
    group: str
    stage_key: str  # "<stage>.<key>" inside the group, as the group's ``schedules:`` names it

    @property
    def schedule_path(self) -> str:
        return f"stages.{self.group}.schedules.{self.stage_key}"


def is_population_search(space) -> bool:
    return space.config.scheduler.name in POPULATION_SCHEDULERS


def round_groups(raw_pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["name"]: stage for stage in raw_pipeline.get("stages") or []
            if isinstance(stage, dict) and stage.get("kind") == GROUP_KIND}


def round_value(path: str, raw_pipeline: dict[str, Any]) -> RoundValue | None:
    """``path`` as a per-round value, or None when it is fixed for a whole run."""
    parts = path.split(".")
    groups = round_groups(raw_pipeline)
    if len(parts) < 5 or parts[0] != "stages" or parts[1] not in groups or parts[2] != "stages":
        return None
    inner = [stage.get("name") for stage in groups[parts[1]].get("stages") or []]
    return RoundValue(path, parts[1], ".".join(parts[3:])) if parts[3] in inner else None


def mutable_values(space) -> dict[str, RoundValue]:
    """The parameters PBT perturbs: per-round leaves not marked ``mutable: false``."""
    from selftune.search.space import ConditionalParam

    found = {}
    for path, param in space.params.items():
        value = round_value(path, space.raw_pipeline)
        if value is not None and not isinstance(param, ConditionalParam) and param.mutable is not False:
            found[path] = value
    return found


def searched_group(space) -> tuple[str, int]:
    """The rounds group whose rounds PBT counts, and its number of rounds."""
    (group,) = {value.group for value in mutable_values(space).values()}
    return group, round_groups(space.raw_pipeline)[group]["rounds"]


def check_population_space(space) -> None:
    """A PBT/PB2 space's own rules; every message names the key and what would be valid."""
    from selftune.search.space import ConditionalParam

    settings, where = space.config.scheduler, f"{space.source}: scheduler"
    if space.config.budget.disk is not None:  # a clone continues from its donor's stages in the store
        raise ConfigError(f"{space.source}: budget.disk: not with scheduler {settings.name} (an exploit rebuilds the "
                          "donor's stages from the stage store, which a budget would prune); remove it or use asha")
    for path, param in space.params.items():
        if isinstance(param, ConditionalParam):
            raise ConfigError(f"{space.source}: params.{path}: {settings.name} takes plain float, int and categorical "
                              "values (a population needs the same keys in every trial); use one of those")
        if param.mutable and round_value(path, space.raw_pipeline) is None:
            raise ConfigError(
                f"{space.source}: params.{path}.mutable: this value cannot change mid-run (only values of a "
                "stage inside a rounds group can, e.g. stages.dst.stages.train.gamma); remove mutable: true")
    mutable = mutable_values(space)
    if not mutable:
        raise ConfigError(f"{space.source}: params: {settings.name} needs at least one value of a stage inside a "
                          "rounds group to perturb between rounds (e.g. stages.dst.stages.train.gamma)")
    for path in mutable:
        param = space.params[path]
        choices = getattr(param, "choices", None)
        if choices is not None and not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            raise ConfigError(f"{space.source}: params.{path}: a value that changes per round runs as a list of numbers, "
                              f"and {choices!r} are not all numbers; mark it mutable: false")
    groups = sorted({value.group for value in mutable.values()})
    if len(groups) > 1:
        raise ConfigError(f"{space.source}: params: {settings.name} perturbs the rounds of one group; these values "
                          f"span {', '.join(groups)}")
    group, rounds = searched_group(space)
    if any(path == f"stages.{group}.rounds" for path in space.params):
        raise ConfigError(f"{space.source}: params.stages.{group}.rounds: a population runs its rounds in lock-step; "
                          "fix the number of rounds")
    if not isinstance(rounds, int) or rounds < 2:
        raise ConfigError(f"{where}.name: {settings.name} needs a rounds group of at least 2 rounds to perturb "
                          f"between; stages.{group}.rounds is {rounds!r}")
    if settings.population < 2:
        raise ConfigError(f"{where}.population: a population needs at least 2 trials, got {settings.population}")
    if settings.perturbation_interval >= rounds:
        raise ConfigError(f"{where}.perturbation_interval: must be less than the {rounds} rounds of stages.{group} "
                          f"(a perturbation after the last round changes nothing), got {settings.perturbation_interval}")
    if settings.burn_in >= rounds:
        raise ConfigError(f"{where}.burn_in: must be less than the {rounds} rounds of stages.{group}, got {settings.burn_in}")
    if not space.config.stage_cache:
        raise ConfigError(f"{space.source}: stage_cache: {settings.name} exploits through the stage cache; it must stay true")
    if settings.name == "pb2":
        _check_pb2(space, mutable)


def _check_pb2(space, mutable: dict[str, RoundValue]) -> None:
    from selftune.search.space import CategoricalParam

    for path in mutable:
        if isinstance(space.params[path], CategoricalParam):
            raise ConfigError(f"{space.source}: params.{path}: pb2 perturbs numbers within bounds; make it a float or "
                              "an int, or mark it mutable: false")
    try:
        import GPy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"{space.source}: scheduler.name: pb2 needs GPy and scikit-learn ({error.name} is missing); "
                          f"install them with: {PB2_EXTRA}") from None


# -- the population --------------------------------------------------------------------------

def initial_population(space) -> list[dict[str, Any]]:
    """``population`` samples of the space's distributions, drawn by Optuna with the searcher's seed."""
    import optuna

    settings = space.config.scheduler
    sampler = optuna.samplers.RandomSampler(seed=space.config.searcher.seed)
    study = optuna.create_study(sampler=sampler, direction="maximize" if space.config.objective.mode == "max" else "minimize")
    population = []
    for _ in range(settings.population):
        trial = study.ask()
        space.suggest(trial)
        population.append(dict(trial.params))
    return population


def make_population_scheduler(space):
    """Tune's synchronous ``PopulationBasedTraining`` (or ``PB2``), counting rounds."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    settings, mutable = space.config.scheduler, mutable_values(space)
    random.seed(settings.seed)  # Tune's explore step draws from Python's random module
    # metric and mode come from the TuneConfig, as for every scheduler. The burn-in is the trials'
    # doing (no `round` reported before it), because PB2 has none of its own.
    common = dict(time_attr=ROUND, perturbation_interval=settings.perturbation_interval,
                  quantile_fraction=settings.quantile_fraction, synch=True, require_attrs=False,
                  custom_explore_fn=lambda config: within_bounds(config, space, mutable))
    if settings.name == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        bounds = {path: [space.params[path].low, space.params[path].high] for path in mutable}
        return PB2(hyperparam_bounds=bounds, **common)
    mutations = {path: _tune_domain(tune, space.params[path]) for path in mutable}
    return PopulationBasedTraining(hyperparam_mutations=mutations, resample_probability=settings.resample_probability, **common)


def reports_round(done: int, burn_in: int, rounds: int) -> bool:
    """Whether a trial reports ``round`` (PBT's clock) after ``done`` rounds: not during the
    burn-in, and not once the last round ran (PBT would exploit there: a clone would only copy)."""
    return burn_in <= done < rounds


def _tune_domain(tune, param):
    from selftune.search.space import CategoricalParam, FloatParam

    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, FloatParam):
        return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)
    return tune.lograndint(param.low, param.high + 1) if param.log else tune.randint(param.low, param.high + 1)


def within_bounds(config: dict[str, Any], space, mutable: dict[str, RoundValue]) -> dict[str, Any]:
    """PBT's perturbation multiplies by 0.8 or 1.2: keep the result inside the parameter's range."""
    from selftune.search.space import CategoricalParam, IntParam

    for path in mutable:
        param = space.params[path]
        if isinstance(param, CategoricalParam) or config.get(path) is None:
            continue
        value = min(max(config[path], param.low), param.high)
        config[path] = int(round(value)) if isinstance(param, IntParam) else float(value)
    return config


# -- one trial's realised values -------------------------------------------------------------

def realised_overrides(space, config: dict[str, Any], realised: dict[str, list[Any]]) -> dict[str, Any]:
    """The explicit per-round schedule of every mutable value: the rounds already run keep the
    values they ran with (``realised``), the rest take the trial's current value."""
    group, rounds = searched_group(space)
    overrides = {}
    for path, value in mutable_values(space).items():
        done = list(realised.get(path, []))[:rounds]
        overrides[value.schedule_path] = {"shape": "list", "values": done + [config[path]] * (rounds - len(done))}
    return overrides


def rounds_done(pipeline: PipelineConfig, index: int, group: str) -> int:
    """Rounds of ``group`` complete once stage ``index`` has run."""
    in_group = [i for i, stage in enumerate(pipeline.stages) if stage.group == group]
    if not in_group or index < in_group[0]:
        return 0
    stage = pipeline.stages[index]
    if stage.group != group:
        return max(pipeline.stages[i].round for i in in_group)
    last_of_round = max(i for i in in_group if pipeline.stages[i].round == stage.round)
    return stage.round if index == last_of_round else stage.round - 1


def realised_after(overrides: dict[str, Any], space, done_rounds: int) -> dict[str, list[Any]]:
    """Per mutable value, the values of the rounds run so far."""
    return {path: overrides[value.schedule_path]["values"][:done_rounds] for path, value in mutable_values(space).items()}


def schedule_fragment(space, config: dict[str, Any], realised: dict[str, list[Any]]) -> dict[str, Any]:
    """The pipeline values a finished trial ran with, as dotted keys: the space's fixed values
    and the trial's sampled ones, each mutable value as its explicit per-round list."""
    fixed = {path: value for path, value in space.values_for(config).items() if path not in mutable_values(space)}
    return {**fixed, **realised_overrides(space, config, realised)}


def round_summary(round_index: int, results, group: str) -> dict[str, Any]:
    """What the population picture shows for one finished round of one trial."""
    mine = [r for r in results if r.name.startswith(f"{group}-r{round_index}-")]
    found = {"round": round_index}
    for result in mine:
        for key in ("select/miou", "val/miou", "pseudo_label/miou", "pseudo_label/kept_fraction"):
            if key in result.summary:
                found[key] = result.summary[key]
    return found


def plot_population(records: dict[str, dict[str, Any]], best: str | None, space, path: Path) -> Path:
    """Left: each trial's selection mIoU per round, exploits drawn as jumps from the donor.
    Right: the best trial's realised values per round beside its pseudo-label mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for trial_id, record in sorted(records.items()):
        own = {r["round"]: r.get("select/miou") for r in record.get("rounds", [])}
        points = sorted((r, v) for r, v in own.items() if v is not None)
        if points:
            left.plot(*zip(*points), marker="o", label=trial_id, linewidth=2.5 if trial_id == best else 1)
        for exploit in record.get("exploits", []):
            donor_value = {r["round"]: r.get("select/miou") for r in records.get(exploit["donor"], {}).get("rounds", [])}.get(exploit["round"])
            if donor_value is not None:
                left.annotate("", xy=(exploit["round"] + 0.15, donor_value), xytext=(exploit["round"], own.get(exploit["round"], donor_value)),
                              arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "grey"})
    left.set(title="population: selection mIoU per round (arrows: exploits)", xlabel="round", ylabel="select/miou")
    left.legend(fontsize=7)
    if best in records:
        record = records[best]
        for name, values in record.get("realised", {}).items():
            right.plot(range(1, len(values) + 1), values, marker="s", label=name.rsplit(".", 1)[-1])
        quality = [(r["round"], r["pseudo_label/miou"]) for r in record.get("rounds", []) if "pseudo_label/miou" in r]
        if quality:
            twin = right.twinx()
            twin.plot(*zip(*quality), color="black", linestyle=":", marker="x", label="pseudo-label mIoU")
            twin.set_ylabel("pseudo-label mIoU")
            twin.legend(loc="lower right", fontsize=7)
        right.set(title=f"best trial {best}: its schedule", xlabel="round", ylabel="value")
        right.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def changed_values(before: dict[str, Any], after: dict[str, Any], mutable) -> str:
    """``gamma 9.1 -> 10.9, alpha 0.3 -> 0.36`` for the mutable values that differ."""
    parts = []
    for path in mutable:
        old, new = before.get(path), after.get(path)
        if old != new:
            parts.append(f"{path.rsplit('.', 1)[-1]} {_short(old)} -> {_short(new)}")
    return ", ".join(parts) or "no value changed"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def write_trial_record(folder: str, trial_id: str, record: dict[str, Any]) -> None:
    """``<search>/pbt/<trial id>.json``: the trial's config, realised values and exploits so far."""
    path = Path(folder) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


def read_trial_record(folder: str, trial_id: str) -> dict[str, Any]:
    path = Path(folder) / f"{trial_id}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
