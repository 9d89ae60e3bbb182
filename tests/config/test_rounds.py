"""Rounds groups: stages repeated with scheduled values, references renamed per round."""

from __future__ import annotations

import pytest

from selftune.config import validate_pipeline
from selftune.errors import ConfigError


def dst_like(rounds: int = 3, **group_extra) -> dict:
    return {
        "name": "dst",
        "stages": [
            {"name": "sup", "kind": "supervised"},
            {
                "name": "dst", "kind": "rounds", "rounds": rounds,
                "schedules": {"label": {"threshold": {"shape": "linear", "start": 0.5, "end": 0.9}}},
                "stages": [
                    {"name": "label", "kind": "pseudo_label"},
                    {"name": "train", "kind": "self_train", "init_from": "previous", "pseudo_labels": "label"},
                ],
                **group_extra,
            },
        ],
    }


def test_group_expands_into_named_rounds_with_scheduled_values():
    pipeline = validate_pipeline(dst_like(), source="d.yaml")
    names = [stage.name for stage in pipeline.stages]
    assert names == ["sup", "dst-r1-label", "dst-r1-train", "dst-r2-label", "dst-r2-train", "dst-r3-label", "dst-r3-train"]
    # linear 0.5 -> 0.9 over 3 rounds: 0.5, 0.7, 0.9
    assert [pipeline.stage(f"dst-r{r}-label").threshold for r in (1, 2, 3)] == pytest.approx([0.5, 0.7, 0.9])
    assert [pipeline.stage(f"dst-r{r}-label").round for r in (1, 2, 3)] == [1, 2, 3]
    assert {pipeline.stage(n).group for n in names[1:]} == {"dst"}


def test_each_round_labels_with_the_previous_rounds_model_and_fine_tunes_it():
    pipeline = validate_pipeline(dst_like(), source="d.yaml")
    assert pipeline.stage("dst-r1-label").model_from == "sup"
    assert pipeline.stage("dst-r2-label").model_from == "dst-r1-train"
    assert pipeline.stage("dst-r1-train").init_from == "sup"  # "previous" = closest earlier training stage
    assert pipeline.stage("dst-r3-train").init_from == "dst-r2-train"
    assert pipeline.stage("dst-r2-train").pseudo_labels == "dst-r2-label"  # inner name -> same round


def test_overrides_reach_the_group_before_expansion():
    pipeline = validate_pipeline(
        dst_like(), source="d.yaml",
        overrides=["stages.dst.rounds=2", "stages.dst.schedules.label.threshold.end=0.6", "stages.dst.stages.train.epochs=4"],
    )
    assert [s.name for s in pipeline.stages][-1] == "dst-r2-train"
    assert pipeline.stage("dst-r2-label").threshold == pytest.approx(0.6)
    assert pipeline.stage("dst-r1-train").epochs == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds": 0}, r"stages.dst.rounds: must be a whole number >= 1, got 0"),
        ({"schedules": {"nope": {"threshold": {"shape": "constant", "value": 0.5}}}}, r"stages.dst.schedules.nope.threshold: 'nope' is not a stage of this group"),
        ({"schedules": {"label": {"threshold": {"shape": "zigzag"}}}}, r"stages.dst.schedules.label.threshold.shape: .*valid shapes"),
        ({"schedules": {"label": {"threshold": {"shape": "list", "values": [0.5]}}}}, r"label.threshold"),
        ({"schedules": {"label": 0.5}}, r"stages.dst.schedules.label: expected a mapping"),
        ({"repeat": 2}, r"stages.dst.repeat: unknown key"),
    ],
)
def test_bad_groups_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_pipeline(dst_like(**change), source="d.yaml")


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"shape": "linear", "start": 0.5, "end": 1.5},
         "^d.yaml: stages.dst.schedules.label.threshold.end: Input should be less than or equal to 1, got 1.5 [(]round 3 of 3 would get 1.5[)]$"),
        ({"shape": "cosine", "start": -0.5, "end": 0.9}, "stages.dst.schedules.label.threshold.start: .*greater than or equal to 0, got -0.5 [(]round 1 of 3"),
        ({"shape": "step", "start": 0.5, "milestones": [2], "factor": 3}, "stages.dst.schedules.label.threshold.factor: .*got 3 [(]round 3 of 3 would get 1.5[)]"),
        ({"shape": "list", "values": [0.5, 2, 0.7]}, r"stages.dst.schedules.label.threshold.values\[1\]: .*got 2 [(]round 2 of 3"),
        ({"shape": "constant", "value": 7}, "stages.dst.schedules.label.threshold.value: .*got 7 [(]round 1 of 3"),
    ],
)
def test_a_scheduled_value_out_of_range_names_the_schedule_key_the_user_wrote(schedule, message):
    raw = dst_like()
    raw["stages"][1]["schedules"] = {"label": {"threshold": schedule}}
    with pytest.raises(ConfigError, match=message) as caught:
        validate_pipeline(raw, source="d.yaml")
    assert "dst-r" not in str(caught.value)  # not the expanded stage's name


def test_a_scheduled_value_the_schema_refuses_otherwise_names_the_schedule_and_round():
    raw = dst_like()  # epochs 1 -> 2 over 3 rounds: round 2 would train 1.5 epochs
    raw["stages"][1]["schedules"] = {"train": {"epochs": {"shape": "linear", "start": 1, "end": 2}}}
    with pytest.raises(ConfigError, match=r"^d.yaml: stages.dst.schedules.train.epochs: round 2 of 3 would get 1.5: Input should be a valid integer"):
        validate_pipeline(raw, source="d.yaml")


def test_stage_names_cannot_contain_dots_because_dotted_keys_address_them():
    raw = {"name": "x", "stages": [{"name": "a.b", "kind": "supervised"}]}
    with pytest.raises(ConfigError, match=r"stages.a.b.name"):
        validate_pipeline(raw, source="x.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.dst.stages.train.epochs=0", r"^d.yaml: stages\.dst\.stages\.train\.epochs: .*greater than or equal to 1, got 0$"),
        ("stages.dst.stages.train.epohcs=2", r"^d.yaml: stages\.dst\.stages\.train\.epohcs: unknown key"),
        ("stages.dst.stages.train.init_from=nope", r"^d.yaml: stages\.dst\.stages\.train\.init_from: 'nope' is not a stage"),
    ],
)
def test_an_inner_stage_error_names_the_key_under_the_group(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_pipeline(dst_like(), source="d.yaml", overrides=[override])
