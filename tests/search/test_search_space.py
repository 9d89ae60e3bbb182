"""Search spaces: validation like Optuna's distributions, paths checked against the pipeline,
conditional groups, and conversion of a sample into pipeline values."""

from __future__ import annotations

import re

import optuna
import pytest
import yaml

import selftune.stages  # noqa: F401  (registers the stage kinds the pipelines use)
from selftune.errors import ConfigError
from selftune.search.space import load_search_space
from support import REPO

QUICKSTART = REPO / "pipelines" / "quickstart.yaml"
DST_CBC = REPO / "pipelines" / "dst_cbc.yaml"


def write_space(tmp_path, params, pipeline=QUICKSTART, **extra):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"pipeline": str(pipeline), "params": params, **extra}))
    return path


def test_the_shipped_spaces_load():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_search_space(path)
        assert space.params, path
        assert space.pipeline_path.is_file()


@pytest.mark.parametrize("spec, message", [
    # Optuna's own rules, in Optuna's words: the space builds Optuna's distributions to validate
    ({"type": "float", "low": 0.9, "high": 0.5},
     r"params\.stages\.pseudo_label\.threshold: not a valid Optuna distribution: `low <= high` must hold, but got \(low=0\.9, high=0\.5\)"),
    ({"type": "float", "low": 0.0, "high": 0.5, "log": True}, r"`low > 0` must hold for `log=True`, but got \(low=0\.0"),
    ({"type": "int", "low": 1, "high": 5, "log": True, "step": 2}, r"only accept step is 1 when `log` argument is True"),
    ({"type": "float", "low": 0.5, "high": 0.9, "log": True, "step": 1}, r"`step` is not supported when `log` is true"),
    ({"type": "float", "low": 0.5, "high": 0.9, "step": 0}, r"`step > 0` must hold"),
    ({"type": "int", "low": 0, "high": 3, "log": True}, r"`low >= 1` must hold for `log=True`"),
    ({"type": "float", "low": 0.5, "high": float("inf")}, r"\.high: Input should be a finite number"),
    ({"type": "categorical", "choices": []}, r"choices: List should have at least 1 item"),
    ({"type": "uniform", "low": 0, "high": 1}, r"\.type: unknown parameter type 'uniform'; valid: categorical, conditional, float, int"),
    ({"type": "float", "low": 0.5, "high": 0.9, "lo": 1}, r"\.lo: unknown key; valid keys are: type, low, high, log, step"),
    (0.5, r"a parameter is a mapping with type"),
])
def test_bad_distributions_are_one_line_errors_naming_file_and_key(tmp_path, spec, message):
    path = write_space(tmp_path, {"stages.pseudo_label.threshold": spec})
    with pytest.raises(ConfigError, match=message) as error:
        load_search_space(path)
    assert str(error.value).startswith(str(path))
    assert "\n" not in str(error.value)


def test_a_path_that_is_not_in_the_pipeline_is_an_error(tmp_path):
    path = write_space(tmp_path, {"stages.self_train.optimiser.lr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError, match=r"space\.yaml: params\.stages\.self_train\.optimiser\.lr: no such value in the pipeline"):
        load_search_space(path)
    path = write_space(tmp_path, {"stages.nope.epochs": {"type": "int", "low": 1, "high": 2}})
    with pytest.raises(ConfigError, match=r"stages\.nope\.epochs"):
        load_search_space(path)


def test_schema_defaults_are_searchable_even_when_the_yaml_omits_them(tmp_path):
    # quickstart.yaml does not write pseudo_weight; the schema's default makes it a real value.
    space = load_search_space(write_space(tmp_path, {"stages.self_train.pseudo_weight": {"type": "float", "low": 0, "high": 2}}))
    assert space.pipeline_for({"stages.self_train.pseudo_weight": 1.5}).stage("self_train").pseudo_weight == 1.5


def test_a_bound_the_pipeline_rejects_is_caught_before_ray_starts(tmp_path):
    # threshold must lie in [0, 1]: the upper bound 1.5 gives an invalid pipeline.
    path = write_space(tmp_path, {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 1.5}})
    with pytest.raises(ConfigError, match=r"the sample \{stages\.pseudo_label\.threshold=1\.5\} gives an invalid pipeline: .*threshold"):
        load_search_space(path)


def test_unknown_points_to_evaluate_names_are_errors(tmp_path):
    path = write_space(tmp_path, {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}},
                       searcher={"points_to_evaluate": [{"stages.pseudo_label.thresh": 0.7}]})
    with pytest.raises(ConfigError, match=r"searcher\.points_to_evaluate\.0: unknown parameter 'stages\.pseudo_label\.thresh'"):
        load_search_space(path)


ALPHA = "stages.dst.schedules.label.alpha"
CONDITIONAL = {
    ALPHA: {
        "type": "conditional", "key": "shape",
        "branches": {
            "linear": {"start": {"type": "float", "low": 0.1, "high": 0.5}, "end": 1.0},
            "step": {"start": {"type": "float", "low": 0.1, "high": 0.3}, "milestones": [2, 4],
                     "factor": {"type": "float", "low": 1.5, "high": 1.8}},
            "cosine": {"start": 0.2, "end": {"type": "float", "low": 0.8, "high": 1.0}},
        },
    },
    "stages.dst.stages.train.gamma": {"type": "categorical", "choices": [0.0, 2.0, 9.0]},
}


def test_a_conditional_group_becomes_the_chosen_schedule(tmp_path):
    space = load_search_space(write_space(tmp_path, CONDITIONAL, pipeline=DST_CBC))
    sample = {f"{ALPHA}.shape": "step", f"{ALPHA}.step.start": 0.2, f"{ALPHA}.step.factor": 2.0,
              "stages.dst.stages.train.gamma": 2.0}
    assert space.values_for(sample)[ALPHA] == {"shape": "step", "start": 0.2, "milestones": [2, 4], "factor": 2.0}
    pipeline = space.pipeline_for(sample)
    labels = [stage for stage in pipeline.stages if stage.kind == "class_balanced_label"]
    # 5 rounds, step schedule 0.2 x2 at rounds 2 and 4 (0-based indices): 0.2 0.2 0.4 0.4 0.8
    assert [round(stage.alpha, 6) for stage in labels] == [0.2, 0.2, 0.4, 0.4, 0.8]
    assert {stage.gamma for stage in pipeline.stages if stage.kind == "dst_train"} == {2.0}


def test_optuna_samples_only_the_chosen_branch(tmp_path):
    space = load_search_space(write_space(tmp_path, CONDITIONAL, pipeline=DST_CBC))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    shapes = set()
    for _ in range(12):
        trial = study.ask()
        space.suggest(trial)
        shape = trial.params[f"{ALPHA}.shape"]
        shapes.add(shape)
        branch_names = {name for name in trial.params if name.startswith(f"{ALPHA}.") and name != f"{ALPHA}.shape"}
        assert branch_names and all(name.startswith(f"{ALPHA}.{shape}.") for name in branch_names)
        space.pipeline_for(trial.params)  # every sample is a valid pipeline
        study.tell(trial, 0.0)
    assert shapes == {"linear", "step", "cosine"}


QUICK_SPACE = {
    "stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9},
    "stages.self_train.optimizer.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "stages.supervised.optimizer.lr": {"type": "categorical", "choices": [0.002, 0.004]},
    "stages.self_train.epochs": {"type": "int", "low": 1, "high": 5, "step": 2},
}


@pytest.mark.parametrize("name, value, valid", [
    ("stages.self_train.optimizer.lr", 5.0, r"0\.0001\.\.0\.01 \(log\)"),  # issue 12: lr 5.0 ran
    ("stages.pseudo_label.threshold", 0.2, r"0\.5\.\.0\.9"),
    ("stages.supervised.optimizer.lr", 0.003, r"one of 0\.002, 0\.004"),
    ("stages.self_train.epochs", 2, r"1\.\.5 in steps of 2"),  # off the step grid
    ("stages.self_train.epochs", True, r"1\.\.5 in steps of 2"),  # YAML true is not 1
    ("stages.pseudo_label.threshold", "high", r"0\.5\.\.0\.9"),
])
def test_points_to_evaluate_outside_the_space_are_refused_at_load(tmp_path, name, value, valid):
    point = {"stages.pseudo_label.threshold": 0.7, name: value}
    path = write_space(tmp_path, QUICK_SPACE, searcher={"points_to_evaluate": [{}, point]})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    message = str(error.value)
    assert message.startswith(f"{path}: searcher.points_to_evaluate.1.{name}: {value!r} is outside the searched space")
    assert re.search(f"valid: {valid}$", message) and "\n" not in message


def test_points_to_evaluate_inside_the_space_load(tmp_path):
    point = {"stages.pseudo_label.threshold": 0.9, "stages.self_train.optimizer.lr": 1.0e-4,
             "stages.supervised.optimizer.lr": 0.004, "stages.self_train.epochs": 5}
    space = load_search_space(write_space(tmp_path, QUICK_SPACE, searcher={"points_to_evaluate": [point]}))
    assert space.config.searcher.points_to_evaluate == [point]


def test_a_point_in_a_conditional_group_is_checked_in_its_branch(tmp_path):
    chosen = {f"{ALPHA}.shape": "cosine"}  # the cosine branch's end is sampled; the point is completed there
    load_search_space(write_space(tmp_path, CONDITIONAL, pipeline=DST_CBC, searcher={"points_to_evaluate": [chosen]}))
    for point, key in [({f"{ALPHA}.shape": "exp"}, f"{ALPHA}.shape"),
                       ({f"{ALPHA}.shape": "step", f"{ALPHA}.step.factor": 1.2}, f"{ALPHA}.step.factor")]:
        path = write_space(tmp_path, CONDITIONAL, pipeline=DST_CBC, searcher={"points_to_evaluate": [point]})
        with pytest.raises(ConfigError, match=rf"points_to_evaluate\.0\.{re.escape(key)}: .* is outside the searched space"):
            load_search_space(path)


def test_a_schedule_corner_that_leaves_the_valid_range_is_caught(tmp_path):
    # 0.3 * 3.0^2 = 2.7 > 1 in the last round: alpha must stay a fraction.
    space = {ALPHA: {"type": "conditional", "key": "shape", "branches": {
        "step": {"start": 0.3, "milestones": [2, 4], "factor": {"type": "float", "low": 1.5, "high": 3.0}}}}}
    with pytest.raises(ConfigError, match=r"alpha\.step\.factor=3\.0.* gives an invalid pipeline: .*stages\.dst\.schedules\.label\.alpha\.factor: Input should be less than or equal to 1, got 3\.0"):
        load_search_space(write_space(tmp_path, space, pipeline=DST_CBC))


def test_every_branch_is_validated_against_the_pipeline(tmp_path):
    bad = {ALPHA: {"type": "conditional", "key": "shape", "branches": {"linear": {"start": 0.2}}}}  # no end
    with pytest.raises(ConfigError, match=r"gives an invalid pipeline: .*end"):
        load_search_space(write_space(tmp_path, bad, pipeline=DST_CBC))


def test_grid_needs_discrete_parameters(tmp_path):
    space = load_search_space(write_space(tmp_path, {
        "stages.pseudo_label.threshold": {"type": "categorical", "choices": [0.7, 0.9]},
        "stages.self_train.epochs": {"type": "int", "low": 1, "high": 3},
    }))
    assert space.grid() == {"stages.pseudo_label.threshold": [0.7, 0.9], "stages.self_train.epochs": [1, 2, 3]}
    continuous = load_search_space(write_space(tmp_path, {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}}))
    with pytest.raises(ConfigError, match=r"params\.stages\.pseudo_label\.threshold: the grid searcher needs"):
        continuous.grid()


def test_set_overrides_go_to_the_space_or_the_pipeline(tmp_path):
    path = write_space(tmp_path, {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}})
    space = load_search_space(path, ["budget.num_samples=3", "stages.supervised.epochs=1"])
    assert space.config.budget.num_samples == 3
    assert space.pipeline_for(space.default_sample()).stage("supervised").epochs == 1


PAPERS_KNOBS = {  # issue 14: knobs the papers tune, each in its method's shipped space
    "dst_cbc": ["stages.dst.stages.train.optimizer.weight_decay", "stages.dst.stages.train.gamma"],
    "u2pl": ["stages.u2pl.r_h", "stages.u2pl.ema_decay", "stages.u2pl.alpha0"],
    "st_plus_plus": ["stages.supervised.snapshots", "stages.select.reliable_fraction"],
    "saug_dsbn_scl": ["stages.saug.rounds", "stages.saug.stages.label.flip", "stages.saug.stages.label.scales",
                      "stages.saug.stages.student.n_ops"],
    "three_stage": ["stages.stage2.shared_blocks", "stages.stage2.optimizer.lr", "stages.stage3.optimizer.lr"],
}


@pytest.mark.parametrize("name", sorted(PAPERS_KNOBS))
def test_each_method_space_searches_the_knobs_its_paper_tunes(name):
    space = load_search_space(REPO / "search_spaces" / f"{name}.yaml")
    assert set(PAPERS_KNOBS[name]) <= set(space.params)  # and every corner was a valid pipeline at load


def test_a_tta_scale_set_is_chosen_as_text_and_becomes_the_list():
    space = load_search_space(REPO / "search_spaces" / "saug_dsbn_scl.yaml")
    corner = next(iter(space.corner_samples()))  # a full sample, then the scale set chosen
    pipeline = space.pipeline_for({**corner, "stages.saug.stages.label.scales": "0.75,1.0,1.25"})
    labels = [stage for stage in pipeline.stages if stage.kind == "tta_label"]
    assert labels and all(stage.scales == [0.75, 1.0, 1.25] for stage in labels)
