"""ASHA's rungs sit only after stages that measure the objective afresh: a labelling stage reports
the supervised stage's value again, and a second cut on the same value adds nothing but risk."""

from __future__ import annotations

from selftune.search.driver import make_scheduler
from selftune.search.space import load_search_space
from selftune.search.trial import RUNG, rung_stages
from support import REPO

QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"


def test_a_labelling_stage_is_a_rung_only_when_the_objective_is_its_own_metric():
    pipeline = load_search_space(QUICKSTART).pipeline_for(load_search_space(QUICKSTART).default_sample())
    assert [stage.name for stage in pipeline.stages] == ["supervised", "pseudo_label", "self_train"]
    assert rung_stages(pipeline, "select/miou") == [True, False, True]
    assert rung_stages(pipeline, "pseudo_label/miou") == [True, True, True]


def test_the_last_stage_is_always_a_rung():
    space = load_search_space(QUICKSTART)
    pipeline = space.pipeline_for(space.default_sample())
    pipeline = pipeline.model_copy(update={"stages": pipeline.stages[:2]})  # ends with its labelling stage
    assert rung_stages(pipeline, "select/miou") == [True, True]


def test_asha_counts_rungs_not_stages():
    scheduler = make_scheduler(load_search_space(QUICKSTART))
    assert scheduler._time_attr == RUNG and scheduler._max_t == 2  # 3 stages, 2 of them measure select/miou
    # grace 1, reduction 2: milestones at rung 1 (after supervised) and 2 (the end); a trial that has
    # run pseudo_label is still at rung 1, so ASHA does not judge it again on the same value
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [1, 2]
