"""The search optimises the selection images' mIoU, never the reported val mIoU; its end table
ends with the best trial's selection value, val value and the gap."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selftune.runner import StageResult
from selftune.search.space import load_search_space
from selftune.search.summary import TrialRow, best_line
from selftune.search.trial import objective_value
from support import REPO


def _trained(name: str, select: float, val: float) -> StageResult:
    return StageResult(name, "self_train", "/x", None, 0.0, {"select/miou": select, "val/miou": val})


def test_the_default_objective_is_the_selection_mioU_and_never_the_reported_one():
    result = _trained("self_train", select=0.61, val=0.74)
    assert objective_value("select/miou", result, latest_select=0.5) == 0.61
    labelling = StageResult("pseudo_label", "pseudo_label", "/x", None, 0.0, {"pseudo_label/miou": 0.9})
    assert objective_value("select/miou", labelling, latest_select=0.55) == 0.55  # the rung after labelling
    assert objective_value("self_train/val/miou", result, latest_select=0.5) == 0.74  # only when asked by name


@pytest.mark.parametrize("space", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_selects_on_held_out_val_images(space: Path):
    loaded = load_search_space(space)
    assert loaded.config.objective.metric.endswith("select/miou")
    assert loaded.config.set["data.selection"] == 20


def test_the_default_objective_of_a_space_that_names_none(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
                                    "params": {"stages.pseudo_label.threshold": {"type": "float", "low": 0.5, "high": 0.9}}}))
    assert load_search_space(path).config.objective.metric == "select/miou"


def test_the_best_line_shows_the_selection_value_the_val_value_and_their_gap():
    row = TrialRow("t1", "r", "FINISHED", {}, objective=0.7, select_miou=0.7, val_miou=0.6725)
    assert best_line(row) == ("best trial t1: select mIoU 0.7000 (what the search maximised), "
                              "val mIoU 0.6725 on the reported images, gap +0.0275")
    same = TrialRow("t2", "r", "FINISHED", {}, objective=0.7, select_miou=0.7, val_miou=0.7)
    assert "optimistic" in best_line(same)
