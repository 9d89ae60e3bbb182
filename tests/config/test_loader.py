"""Pipeline YAML loading: overrides by dotted key, validation errors that name file and key,
stage references resolved to explicit names."""

from __future__ import annotations

import pytest
import yaml

from selftune.config import flatten, load_pipeline, parse_override, pipeline_to_dict, validate_pipeline
from selftune.errors import ConfigError

RAW = {
    "name": "demo",
    "stages": [
        {"name": "sup", "kind": "supervised", "epochs": 3},
        {"name": "label", "kind": "pseudo_label", "threshold": 0.9},
        {"name": "st", "kind": "self_train", "init_from": "sup"},
    ],
}


def validate(*overrides: str):
    return validate_pipeline(RAW, source="demo.yaml", overrides=overrides)


def test_references_default_to_the_closest_earlier_stage():
    pipeline = validate()
    assert pipeline.stage("label").model_from == "sup"
    assert pipeline.stage("st").pseudo_labels == "label"
    assert pipeline.stage("st").upstream() == {"init": "sup", "pseudo_labels": "label"}


def test_overrides_address_stages_by_name_and_by_position():
    pipeline = validate("stages.sup.epochs=7", "stages.2.pseudo_weight=0.5", "resources.workers=2", "data.labelled=1/8")
    assert pipeline.stage("sup").epochs == 7
    assert pipeline.stage("st").pseudo_weight == 0.5
    assert pipeline.resources.workers == 2
    assert pipeline.data.labelled == "1/8"  # a fraction stays text; the data layer parses it


def test_overrides_do_not_touch_the_callers_dict():
    validate("stages.sup.epochs=9")
    assert RAW["stages"][0]["epochs"] == 3


def test_parse_override_reads_values_as_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("no-equals-sign")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.sup.epochs=0", r"demo.yaml: stages.sup.epochs: .*greater than or equal to 1, got 0"),
        ("stages.sup.epohcs=3", r"demo.yaml: stages.sup.epohcs: unknown key; valid keys here are: .*epochs"),
        ("resources.wrkers=2", r"demo.yaml: resources.wrkers: unknown key; valid keys here are: .*workers"),
        ("stages.nope.epochs=3", r"demo.yaml: stages.nope: no item named 'nope'; names are: sup, label, st"),
        ("stages.label.threshold=1.5", r"demo.yaml: stages.label.threshold: .*less than or equal to 1, got 1.5"),
        ("stages.st.kind=magic", r"demo.yaml: stages.st.kind: unknown stage kind 'magic'; valid kinds are: .*supervised"),
        ("data.scale_range=[2, 1]", r"demo.yaml: data.scale_range: must satisfy 0 < low <= high"),
        ("stages.st.init_from=label", r"demo.yaml: stages.st.init_from: 'label' is not an earlier stage .*valid: sup"),
        ("stages.label.model_from=st", r"demo.yaml: stages.label.model_from: 'st' comes later in the pipeline"),
        ("stages.st.optimizer.lr=-1", r"demo.yaml: stages.st.optimizer.lr: .*greater than 0, got -1"),
        ("resources.max_failures=-1", r"demo.yaml: resources.max_failures: .*greater than or equal to 0, got -1"),
        ("resources.max_failures=1.5", r"demo.yaml: resources.max_failures: Input should be a valid integer, got 1.5"),
        ("resources.max_failures=true", r"demo.yaml: resources.max_failures: Input should be a valid integer, got True"),
    ],
)
def test_bad_values_name_the_file_and_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(override)


def test_duplicate_stage_names_are_refused():
    raw = {"name": "d", "stages": [{"name": "a", "kind": "supervised"}, {"name": "a", "kind": "supervised"}]}
    with pytest.raises(ConfigError, match="stages.a.name: stage names must be unique"):
        validate_pipeline(raw, source="d.yaml")


def test_pseudo_label_stage_needs_a_training_stage_before_it():
    raw = {"name": "d", "stages": [{"name": "label", "kind": "pseudo_label"}]}
    with pytest.raises(ConfigError, match="stages.label.model_from: needs an earlier stage"):
        validate_pipeline(raw, source="d.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML \(line \d+, column \d+\)"):
        load_pipeline(path)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: no such file"):
        load_pipeline(tmp_path / "nowhere.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_pipeline(path)


def test_resolved_pipeline_round_trips_through_yaml(tmp_path):
    pipeline = validate("stages.sup.epochs=4")
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(pipeline_to_dict(pipeline)))
    assert load_pipeline(path) == pipeline


def test_flatten_uses_stage_names():
    flat = flatten(pipeline_to_dict(validate()))
    assert flat["stages.sup.epochs"] == 3
    assert flat["stages.st.optimizer.lr"] == 1e-3
    assert flat["resources.workers"] == 0


def test_a_worker_group_is_restarted_twice_unless_told_otherwise():
    assert validate_pipeline(RAW, source="demo.yaml").resources.max_failures == 2
    assert validate_pipeline(RAW, source="demo.yaml", overrides=["resources.max_failures=0"]).resources.max_failures == 0
