"""u2pl stage: the loss terms, the per-epoch α_t, the pseudo-label quality, warm-up loading, end to end.

(Named ``test_u2pl_stage.py``: ``tests/methods/test_u2pl.py`` already exists.)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from selftune.cli import main
from selftune.config import load_pipeline
from selftune.data.synthetic import generate_synthetic
from selftune.methods.common import ema_decay
from selftune.models import build_model, save_checkpoint
from selftune.stages.data import StageData
from selftune.models.multi_head import multi_head_config
from selftune.data import TwoStreamBatch
from selftune.engine.loop import TrainState
from selftune.errors import ConfigError
from selftune.stages.job import StageJob
from selftune.stages.teacher import MeanTeacher, multi_head_student
from selftune.stages.u2pl import ReliableLabelQuality, U2PLStage, U2PLTerms

REPO = Path(__file__).resolve().parents[2]
C = 3


def _pair() -> MeanTeacher:
    torch.manual_seed(0)
    student = build_model(
        "multi_head", C, base="small_segnet", base_options={"width": 8}, shared_blocks="N-1",
        branch="projection", projection_dim=8,
    )
    return MeanTeacher(student, lambda k, epoch: ema_decay(k, 0.99), parameters_only=True, teacher_train_mode=True)


def _stage(**overrides) -> U2PLStage:
    values = dict(name="u2pl", epochs=2, feature_dim=8, num_queries=4, num_negatives=3, memory_size=50, r_l=1, r_h=3,
                  cutmix_p=0.0)
    return U2PLStage(**{**values, **overrides})


def _batch(n_l: int = 2, n_u: int = 2, size: int = 32) -> TwoStreamBatch:
    torch.manual_seed(1)
    return TwoStreamBatch(
        {"image": torch.randn(n_l, 3, size, size), "mask": torch.randint(0, C, (n_l, size, size))},
        {"image": torch.randn(n_u, 3, size, size), "mask": torch.randint(0, C, (n_u, size, size)),
         "valid": torch.ones(n_u, size, size, dtype=torch.bool)},
    )


STATE = TrainState(epochs=2, steps_per_epoch=10, epoch=1)


def test_alpha_follows_the_epoch_schedule():
    terms = U2PLTerms(_stage(alpha0=0.2, anchor_alpha=0.4, epochs=2), num_classes=C, device=torch.device("cpu"), seed=0)
    seen = [terms.fractions(TrainState(epochs=2, steps_per_epoch=2, epoch=epoch)) for epoch in (1, 1, 2, 2)]
    assert seen == [(0.2, 0.4), (0.2, 0.4), (0.1, 0.2), (0.1, 0.2)]  # α0 (1 - t/T), t = 0, 1


def test_terms_and_the_reliable_fraction_that_is_measured():
    pair = _pair().train()
    terms = U2PLTerms(_stage(alpha0=0.25, contrastive_weight=1.0), num_classes=C, device=torch.device("cpu"), seed=0)
    batch = _batch()
    losses = terms(pair, batch, STATE)
    assert set(losses) == {"sup", "unsup", "contrastive"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n for n, p in pair.student.named_parameters() if p.grad is not None}
    assert any(n.startswith("head.branch.") for n in grads)  # the projection head is trained
    data = StageData(index=_Index(), labelled=[], unlabelled=[])
    state = TrainState(epochs=2, steps_per_epoch=10, epoch=1)
    ReliableLabelQuality(terms, data).after_epoch(state, pair)
    quality = state.metrics
    # np.percentile at 75 % of 2048 pixels, strictly below: 1535 or 1536 of 2048 kept.
    assert quality["train_label/kept_fraction"] == pytest.approx(0.75, abs=1 / 2048 + 1e-9)
    assert {"train_label/miou", "train_label/class_coverage"} <= set(quality)
    assert terms.quality.compute()["kept_fraction"] != terms.quality.compute()["kept_fraction"]  # reset: NaN


def test_cutmix_mixes_the_eval_mode_teachers_labels_with_the_image():
    """p = 1: every unlabelled image gets a box of its partner; the pseudo labels are the eval-mode
    teacher's argmax on the clean images, mixed with the same box, kept where reliable."""
    from selftune.methods.common import apply_cutmix, cutmix_boxes

    pair = _pair().train()
    terms = U2PLTerms(_stage(alpha0=0.0, cutmix_p=1.0, contrastive_weight=0.0), num_classes=C,
                      device=torch.device("cpu"), seed=0)
    batch = _batch()
    clean = pair.teach_eval(batch.unlabelled["image"]).argmax(dim=1)
    box, partner = cutmix_boxes(2, 32, 32, torch.Generator().manual_seed(0), p=1.0)
    assert box.any() and not box.all()
    expected = apply_cutmix(clean, box, partner)
    seen = {}
    terms._measure = lambda pseudo, truth: seen.update(pseudo=pseudo, truth=truth)
    terms(pair, batch, STATE)
    kept = seen["pseudo"] != 255  # alpha0 = 0: all but the single most uncertain pixel are reliable
    assert int(kept.sum()) >= 2 * 32 * 32 - 1
    assert torch.equal(seen["pseudo"][kept], expected[kept])
    assert torch.equal(seen["truth"], apply_cutmix(batch.unlabelled["mask"], box, partner))


def test_zero_contrastive_weight_skips_the_term_but_keeps_the_graph():
    terms = U2PLTerms(_stage(contrastive_weight=0.0), num_classes=C, device=torch.device("cpu"), seed=0)
    losses = terms(_pair().train(), _batch(), STATE)
    assert losses["contrastive"].item() == 0.0 and losses["contrastive"].requires_grad


class _Index:
    num_classes = C
    classes = ["a", "b", "c"]


def test_warm_up_checkpoint_initialises_the_main_path(tmp_path):
    torch.manual_seed(3)
    warm = build_model("small_segnet", C, width=8)
    save_checkpoint(tmp_path / "warm", warm, {"name": "small_segnet", "num_classes": C, "options": {"width": 8}})

    job = StageJob(pipeline=_job().pipeline, stage_index=1, output_dir="/nonexistent", inputs={"init": str(tmp_path / "warm")})
    model_config = {"num_classes": C, **multi_head_config("small_segnet", {"width": 8}, shared_blocks="N-1", branch="projection", projection_dim=8)}
    student = multi_head_student(job, model_config)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), warm.eval()(x), atol=1e-6)


def _job() -> StageJob:
    pipeline = load_pipeline(REPO / "pipelines" / "u2pl.yaml")
    return StageJob(pipeline=pipeline, stage_index=1, output_dir="/nonexistent")


def test_config_knobs_are_validated():
    with pytest.raises(Exception, match="alpha0"):
        _stage(alpha0=1.5)
    assert _stage(init_from="warmup").upstream() == {"init": "warmup"}
    with pytest.raises(ValueError, match="r_l < r_h"):
        _stage(r_l=5, r_h=5)


def test_a_rank_window_without_room_is_refused_when_the_pipeline_loads():
    with pytest.raises(ConfigError, match=r"stages\.u2pl.*r_l < r_h.*r_l=20, r_h=20"):
        load_pipeline(REPO / "pipelines" / "u2pl.yaml", ["stages.u2pl.r_l=20", "stages.u2pl.r_h=20"])


@pytest.mark.slow
def test_u2pl_pipeline_end_to_end(tmp_path, tracking_uri):
    root = generate_synthetic(tmp_path / "tiny", num_train=40, num_val=8)
    sets = [f"data.dataset=folder", f"data.root={root}", "data.labelled=8", "data.eval_batch_size=16",
            "stages.warmup.epochs=1", "stages.warmup.steps_per_epoch=2", "stages.warmup.batch_size=4",
            "stages.u2pl.epochs=2", "stages.u2pl.steps_per_epoch=2", "stages.u2pl.batch_size=2",
            "stages.u2pl.unlabelled_batch_size=2", "stages.u2pl.num_queries=8"]
    args = [a for s in sets for a in ("--set", s)]
    code = main(["run", str(REPO / "pipelines" / "u2pl.yaml"), *args, "--out", str(tmp_path / "out"),
                 "--tracking-uri", tracking_uri, "--experiment", "u2"])
    assert code == 0
    mlflow.set_tracking_uri(tracking_uri)
    # The pipeline run is also named "u2pl"; the stage runs are the ones with a val/best_epoch.
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["u2"], output_format="list")
            if "val/best_epoch" in r.data.metrics}
    assert runs["warmup"].info.status == runs["u2pl"].info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for key in ("train_label/miou", "train_label/kept_fraction", "train_label/class_coverage", "val/miou"):
        history = client.get_metric_history(runs["u2pl"].info.run_id, key)
        assert {m.step for m in history} >= {1, 2}, key  # one point per epoch
    kept = {m.step: m.value for m in client.get_metric_history(runs["u2pl"].info.run_id, "train_label/kept_fraction")}
    assert kept[1] == pytest.approx(0.8, abs=0.02) and kept[2] == pytest.approx(0.9, abs=0.02)  # 1 - α_t
    # After training: the whole unlabelled set in eval mode, measured as every labelling stage does.
    final = client.get_metric_history(runs["u2pl"].info.run_id, "pseudo_label/kept_fraction")
    assert [m.step for m in final] == [2] and 0.85 <= final[0].value <= 0.95
    # The last epoch's reliable-label quality is the stage's summary: the pipeline run (and table) show it.
    pipeline_run = next(r for r in mlflow.search_runs(experiment_names=["u2"], output_format="list")
                        if r.data.tags.get("selftune.kind") == "pipeline")
    assert pipeline_run.data.metrics["u2pl/pseudo_label/kept_fraction"] == pytest.approx(final[0].value)
