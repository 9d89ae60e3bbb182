"""Curricula specs: each shape's values by hand, and one-line ConfigErrors for bad specs."""

from __future__ import annotations

import math

import pytest

from selftune.errors import ConfigError
from selftune.schedules import schedule_value, schedule_values, validate_schedule


def test_dst_cbc_alpha_is_linear_from_0_2_to_1():
    assert schedule_values({"shape": "linear", "start": 0.2, "end": 1.0}, 5) == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_linear_by_hand():
    spec = {"shape": "linear", "start": 10, "end": 0}
    assert schedule_values(spec, 3) == [10.0, 5.0, 0.0]  # 10 + (0 - 10) * i / 2
    assert schedule_value(spec, 0, 1) == 10.0  # a single point is the start


def test_constant_and_bare_number():
    assert schedule_values({"shape": "constant", "value": 0.9}, 3) == [0.9, 0.9, 0.9]
    assert schedule_value(4, 2, 3) == 4.0


def test_cosine_by_hand():
    values = schedule_values({"shape": "cosine", "start": 1.0, "end": 0.0}, 5)
    # end + (start - end) * (1 + cos(pi * i / 4)) / 2
    expected = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert values == pytest.approx(expected, abs=1e-15)
    assert schedule_values({"shape": "cosine", "start": 2.0, "end": 4.0}, 3) == pytest.approx([2.0, 3.0, 4.0])


def test_step_multiplies_or_adds_at_milestones():
    halve = {"shape": "step", "start": 0.8, "milestones": [2, 4], "factor": 0.5}
    assert schedule_values(halve, 6) == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])
    add = {"shape": "step", "start": 1, "milestones": [1, 3], "increment": 2.5}
    assert schedule_values(add, 4) == [1.0, 3.5, 3.5, 6.0]


def test_list():
    assert schedule_values({"shape": "list", "values": [0.3, 0.1, 0.7]}, 3) == [0.3, 0.1, 0.7]


@pytest.mark.parametrize(
    ("spec", "total", "message"),
    [
        ({"shape": "exponential", "start": 1}, 3, r"schedule.shape: shape 'exponential' is not a schedule shape; valid shapes: constant, cosine, linear, list, step"),
        ({"start": 1}, 3, r"schedule.shape: no shape is not a schedule shape"),
        ({"shape": "linear", "start": 0.2}, 5, r"schedule.end: required by a linear schedule \(keys: shape, end, start\)"),
        ({"shape": "linear", "start": 0.2, "end": 1, "ende": 2}, 5, r"schedule.ende: not a key of a linear schedule; its keys are shape, end, start"),
        ({"shape": "linear", "start": "0.2", "end": 1}, 5, r"schedule.start: must be a finite number, but got '0.2'"),
        ({"shape": "constant", "value": True}, 5, r"schedule.value: must be a finite number, but got True"),
        ({"shape": "list", "values": [0.1, 0.2]}, 3, r"schedule.values: has 2 values but the schedule runs over 3 points; give exactly 3"),
        ({"shape": "list", "values": [0.1, None]}, 2, r"schedule.values\[1\]: must be a finite number"),
        ({"shape": "step", "start": 1, "milestones": [2]}, 3, r"exactly one of 'factor' \(multiply\) or 'increment' \(add\)"),
        ({"shape": "step", "start": 1, "milestones": [2], "factor": 2, "increment": 1}, 3, r"exactly one of 'factor'"),
        ({"shape": "step", "start": 1, "milestones": [3, 2], "factor": 2}, 5, r"schedule.milestones\[1\]: milestones must be whole numbers >= 1 in strictly increasing order"),
        ({"shape": "step", "start": 1, "milestones": [2, 5], "factor": 2}, 5, r"schedule.milestones\[1\]: milestone 5 is never reached by a schedule over 5 points"),
        ({"shape": "constant", "value": 1}, 0, r"schedule: a schedule runs over a whole number >= 1 of points, but got total=0"),
        ("linear", 3, r"schedule: a schedule is a number or a mapping with a 'shape' key, but got str 'linear'"),
    ],
)
def test_bad_specs_raise_one_line_config_errors(spec, total, message):
    with pytest.raises(ConfigError, match=message) as error:
        schedule_value(spec, 0, total)
    assert "\n" not in str(error.value)


def test_where_prefixes_the_dotted_key_and_index_is_checked():
    with pytest.raises(ConfigError, match=r"^stages.self_train.alpha.end: required"):
        validate_schedule({"shape": "linear", "start": 0.2}, 5, where="stages.self_train.alpha")
    with pytest.raises(ValueError, match=r"index must be a whole number in 0..4, but got 5"):
        schedule_value({"shape": "linear", "start": 0.2, "end": 1.0}, 5, 5)
    validate_schedule({"shape": "list", "values": [1, 2]})  # no total: length not checked
