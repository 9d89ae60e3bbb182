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


def test_scheduled_value_is_still_validated_by_the_stage_schema():
    raw = dst_like()
    raw["stages"][1]["schedules"] = {"label": {"threshold": {"shape": "linear", "start": 0.5, "end": 1.5}}}
    with pytest.raises(ConfigError, match=r"stages.dst-r3-label.threshold: .*less than or equal to 1"):
        validate_pipeline(raw, source="d.yaml")


def test_stage_names_cannot_contain_dots_because_dotted_keys_address_them():
    raw = {"name": "x", "stages": [{"name": "a.b", "kind": "supervised"}]}
    with pytest.raises(ConfigError, match=r"stages.a.b.name"):
        validate_pipeline(raw, source="x.yaml")
