"""``data.selection``: held-out val images pick the best epoch; val mIoU is reported on the rest."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from selftune.cli import main
from selftune.config import load_pipeline
from selftune.errors import ConfigError
from selftune.stages.data import prepare_data
from support import REPO

QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")


def test_twenty_selection_images_leave_180_reported_on_the_synthetic_data():
    pipeline = load_pipeline(QUICKSTART, ["data.selection=20"])
    data = prepare_data(pipeline.data, pipeline.seed)
    assert len(data.selection) == 20 and len(data.reported) == 180
    assert not {s.id for s in data.selection} & {s.id for s in data.reported}
    again = prepare_data(load_pipeline(QUICKSTART, ["data.selection=20", "seed=3"]).data, 3)
    assert [s.id for s in again.selection] == [s.id for s in data.selection]  # selection_seed, not the pipeline seed
    protocol = prepare_data(load_pipeline(QUICKSTART).data, 0)
    assert protocol.selects_on_val and len(protocol.reported) == 200


def test_a_selection_as_large_as_val_is_refused_naming_the_key(tmp_path, capsys, tracking_uri):
    code = main(["run", QUICKSTART, "--set", "data.selection=200", "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "data.selection" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_best_epochs_are_chosen_by_the_selection_images(tmp_path, tracking_uri, small_synthetic):
    sets = [f"data.root={small_synthetic}", "data.dataset=folder", "data.selection=6", "data.eval_batch_size=16",
            "stages.supervised.epochs=3", "stages.supervised.steps_per_epoch=3", "stages.pseudo_label.threshold=0.5",
            "stages.self_train.epochs=2", "stages.self_train.steps_per_epoch=2"]
    code = main(["run", QUICKSTART, *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "out"),
                 "--tracking-uri", tracking_uri, "--experiment", "sel"])
    assert code == 0
    client = MlflowClient(tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sel"]
    stages = {r.data.tags["selftune.stage"]: r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("selftune.kind") == "stage"}
    for name in ("supervised", "self_train"):
        run_id = stages[name].info.run_id
        select = {m.step: m.value for m in client.get_metric_history(run_id, "select/miou")}
        val = {m.step: m.value for m in client.get_metric_history(run_id, "val/miou")}
        epochs = 3 if name == "supervised" else 2
        per_epoch = {step: value for step, value in select.items() if step <= epochs}
        best_epoch = max(per_epoch, key=lambda step: (per_epoch[step], -step))
        summary = json.loads((tmp_path / "out" / f"{0 if name == 'supervised' else 2}-{name}" / "summary.json").read_text())
        assert summary["val/best_epoch"] == best_epoch  # chosen by select/miou
        assert summary["select/miou"] == per_epoch[best_epoch]
        assert summary["val/miou"] == val[best_epoch]  # reported at the chosen epoch, on the other 10 images
