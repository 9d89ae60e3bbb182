"""benchmarks/methods_table.py's controls: the same start and the same number of optimiser steps
as the method they stand beside; its table says whether a gain clears one std."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from selftune.config import TrainingStageConfig, validate_pipeline
from support import REPO


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("methods_table", REPO / "benchmarks" / "methods_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["methods_table"] = module
    spec.loader.exec_module(module)
    return module


methods_table = _load_benchmark()


@pytest.mark.parametrize("method", methods_table.METHODS)
def test_the_control_trains_as_many_steps_from_the_same_start(method):
    method_file = REPO / "pipelines" / f"{method}.yaml"
    control = validate_pipeline(methods_table.control_pipeline(method_file), source="control")
    (stage,) = control.stages
    assert stage.kind == "supervised" and stage.init_from is None
    trained = [s for s in validate_pipeline(methods_table.read_yaml(method_file), source=method).stages
               if isinstance(s, TrainingStageConfig)]
    assert stage.epochs * stage.steps_per_epoch == sum(s.epochs * s.steps_per_epoch for s in trained)
    first = trained[0]
    assert (stage.batch_size, stage.optimizer, first.init_from) == (first.batch_size, first.optimizer, None)
    method_pipeline = validate_pipeline(methods_table.read_yaml(method_file), source=method)
    assert (control.seed, control.data, control.model) == (method_pipeline.seed, method_pipeline.data, method_pipeline.model)


def test_the_auxiliary_networks_steps_are_not_counted():
    # auxnet: 8 x 50 supervised + 6 x 40 self-training; the auxiliary network's 8 x 20 train another network
    assert methods_table.training_steps(REPO / "pipelines" / "auxnet.yaml") == 640


def _arm(val: float) -> dict:
    return {"val/miou": val, "wall_s": 1.0, "pseudo_label/miou": 0.5, "pseudo_label/kept_fraction": 1.0,
            "pseudo_label/class_coverage": 1.0}


def test_a_gain_beyond_one_std_is_marked_and_one_within_it_is_not():
    results = {
        "clear": {str(s): {"method": _arm(0.70 + d), "control": _arm(0.60 + d)} for s, d in enumerate([0.0, 0.01, 0.02])},
        "noise": {str(s): {"method": _arm(m), "control": _arm(c)} for s, (m, c) in enumerate([(0.60, 0.62), (0.66, 0.60), (0.63, 0.64)])},
    }
    rows = {row[0]: row for row in methods_table.table_rows(results, ["clear", "noise"], [0, 1, 2])}
    assert rows["clear"][4] == "+0.1000" and rows["clear"][5] == "yes"
    assert rows["noise"][4] == "+0.0100" and rows["noise"][5] == "no"  # 0.01 against a std of 0.03
    assert rows["clear"][2] == "0.7100 ± 0.0100"


def test_a_single_seed_has_no_std_and_no_verdict():
    (row,) = methods_table.table_rows({"one": {"0": {"method": _arm(0.7), "control": _arm(0.6)}}}, ["one"], [0, 1, 2])
    assert row[1:6] == ["1", "0.7000 (one seed)", "0.6000 (one seed)", "+0.1000", "- (one seed)"]
