"""selftune against a real tracking server: ``mlflow server`` on PostgreSQL, over HTTP only.

The run's processes never see a database file: everything goes through ``http://127.0.0.1:PORT``,
as Ray workers on other nodes do in the cluster. Checked through the server: the pipeline run →
stage runs tree, params and metrics, and artifacts downloaded through the proxied artifact store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from servers import run_selftune, start_tracking_server
from support import REPO, quickstart_overrides

pytestmark = pytest.mark.slow

STAGES = ["supervised", "pseudo_label", "self_train"]


def test_pipeline_logs_through_postgres_backed_server(tmp_path):
    from mlflow import MlflowClient

    with start_tracking_server(tmp_path / "server", backend="postgres") as url:
        result = run_selftune(
            ["run", str(REPO / "pipelines" / "quickstart.yaml"), *quickstart_overrides(epochs=1, steps=2),
             "--experiment", "server-test", "--out", str(tmp_path / "out"), "--tracking-uri", url],
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert not list(tmp_path.glob("**/mlflow.db")), "a database file was written: something bypassed the server"

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("server-test")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        pipelines = [run for run in runs if run.data.tags.get("selftune.kind") == "pipeline"]
        assert len(pipelines) == 1, [run.data.tags for run in runs]
        pipeline = pipelines[0]
        assert pipeline.info.status == "FINISHED"
        assert "val/miou" in pipeline.data.metrics
        assert pipeline.data.params["stages.supervised.epochs"] == "1"

        stages = [run for run in runs if run.data.tags.get("selftune.kind") == "stage"]
        assert sorted(run.data.tags["selftune.stage"] for run in stages) == sorted(STAGES)
        for stage in stages:
            assert stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
            assert stage.info.status == "FINISHED"
        by_name = {run.data.tags["selftune.stage"]: run for run in stages}
        history = client.get_metric_history(by_name["supervised"].info.run_id, "val/miou")
        assert history and all(0.0 <= point.value <= 1.0 for point in history)
        assert "pseudo_label/kept_fraction" in by_name["pseudo_label"].data.metrics

        # Artifacts go through the server's proxy (mlflow-artifacts:/), not a path the client sees.
        assert pipeline.info.artifact_uri.startswith("mlflow-artifacts:")
        downloaded = Path(client.download_artifacts(pipeline.info.run_id, "pipeline.yaml", str(tmp_path / "dl")))
        assert yaml.safe_load(downloaded.read_text())["name"] == "quickstart"
        stage_artifacts = [item.path for item in client.list_artifacts(by_name["supervised"].info.run_id)]
        assert "confusion_matrix.png" in stage_artifacts
        assert any((tmp_path / "server" / "artifacts").rglob("pipeline.yaml")), "artifacts not stored by the server"

