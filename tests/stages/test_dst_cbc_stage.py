"""DST-CBC stages: the dynamic loss of ``dst_train``, the class-balanced labelling pass, the rounds
pipeline end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from support import REPO, two_stream
from selftune.config import load_pipeline
from selftune.engine.context import WorkerContext
from selftune.errors import ConfigError
from selftune.methods.dst_cbc import dynamic_self_training_loss
from selftune.stages.dst_cbc import dst_terms, gather_concat, sampled_confidences, threshold_metrics
from selftune.stages.self_train import self_training_terms

PIPELINE = str(REPO / "pipelines" / "dst_cbc.yaml")


class Fixed(torch.nn.Module):
    """A 'network' that returns the logits it was built with, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def _batch(masks: torch.Tensor, n_labelled: int):
    return two_stream({"image": torch.zeros(len(masks), 3, *masks.shape[1:]), "mask": masks, "n_labelled": torch.tensor(n_labelled)})


def test_self_train_is_the_plain_per_term_cross_entropy_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 6)
    masks = torch.randint(0, 5, (4, 6, 6))
    masks[2:, :2] = 255
    terms = self_training_terms(0.7)(Fixed(logits), _batch(masks, 2))
    seg = F.cross_entropy(logits[:2], masks[:2], ignore_index=255)
    pseudo = F.cross_entropy(logits[2:], masks[2:], ignore_index=255, reduction="sum") / (masks[2:] != 255).sum()
    assert torch.equal(terms["seg"], seg)
    assert torch.equal(terms["pseudo"], 0.7 * pseudo)


def test_dst_gamma_zero_is_cross_entropy_over_the_shared_pixel_count():
    # gamma is one knob: at 0 the dynamic loss is plain CE over every non-ignored pixel of the
    # batch (labelled + pseudo-labelled together), the authors' normalisation, and small gammas
    # approach it continuously (the old self_train switched to per-term means at exactly 0).
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 6)
    masks = torch.randint(0, 5, (4, 6, 6))
    masks[2:, :3] = 255  # fewer valid pixels on the pseudo side: per-term means would differ
    terms = dst_terms(1.0, 0.0)(Fixed(logits), _batch(masks, 2))
    shared = F.cross_entropy(logits, masks, ignore_index=255)  # one mean over the whole batch
    assert (terms["seg"] + terms["pseudo"]).item() == pytest.approx(shared.item(), rel=1e-6)
    near_zero = dst_terms(1.0, 1e-6)(Fixed(logits), _batch(masks, 2))
    assert (near_zero["seg"] + near_zero["pseudo"]).item() == pytest.approx(shared.item(), rel=1e-4)
    per_term = self_training_terms(1.0)(Fixed(logits), _batch(masks, 2))
    assert (per_term["seg"] + per_term["pseudo"]).item() != pytest.approx(shared.item(), rel=1e-3)


def test_dst_terms_add_up_to_the_weight_mask_form_of_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(4, 3, 5, 5)
    masks = torch.randint(0, 3, (4, 5, 5))
    masks[0, 0] = 255
    masks[3, :, :2] = 255
    terms = dst_terms(1.0, 9.0)(Fixed(logits), _batch(masks, 2))
    authors = dynamic_self_training_loss(logits, masks, 9.0, weight_mask=torch.arange(4) >= 2)
    assert (terms["seg"] + terms["pseudo"]).item() == pytest.approx(authors.item(), rel=1e-6)


def test_dynamic_terms_match_a_hand_computed_batch():
    # Image 0 labelled: logits (0, 0), label 0 -> CE ln 2, weight 1.
    # Image 1 pseudo: pixel a logits (ln 3, 0) -> p = (0.75, 0.25), label 0: CE -ln 0.75, weight 0.75^2;
    #                 pixel b ignored. Image 0's second pixel ignored too. 2 valid pixels in the batch.
    logits = torch.zeros(2, 2, 1, 2)
    logits[1, 0, 0, 0] = math.log(3.0)
    masks = torch.tensor([[[0, 255]], [[0, 255]]])
    terms = dst_terms(1.0, 2.0)(Fixed(logits), _batch(masks, 1))
    assert terms["seg"].item() == pytest.approx(math.log(2.0) / 2)
    assert terms["pseudo"].item() == pytest.approx(0.75**2 * -math.log(0.75) / 2)
    # pseudo_weight scales only the pseudo term
    halved = dst_terms(0.5, 2.0)(Fixed(logits), _batch(masks, 1))
    assert halved["pseudo"].item() == pytest.approx(0.5 * terms["pseudo"].item())
    assert halved["seg"].item() == pytest.approx(terms["seg"].item())


def test_dynamic_terms_backpropagate_through_the_ce_only():
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    masks = torch.randint(0, 3, (2, 2, 2))
    terms = dst_terms(1.0, 9.0)(Fixed(logits), _batch(masks, 1))
    sum(terms.values()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_samples_skip_the_batch_padding_and_take_every_nth_pixel():
    # Two images padded to 4x4; the second is really 2x3. Valid pixels in memory order: 16 + 6.
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 5.0  # image 0 predicts class 1 everywhere
    logits[1, 2] = torch.arange(16.0).view(4, 4)  # image 1 predicts 2, more sure further right/down
    batch = {"image": torch.zeros(2, 3, 4, 4), "size": torch.tensor([[4, 4], [2, 3]])}
    (conf,), (pred,) = sampled_confidences(Fixed(logits), [batch], WorkerContext(), sample_every=5)
    # Per image, as the authors' successor code: image 0's pixels 0, 5, 10, 15; image 1's pixels
    # 0 and 5 of its own 2x3 crop, i.e. (0, 0) and (1, 2); the padding is never sampled.
    assert pred.tolist() == [1, 1, 1, 1, 0, 2]  # (0, 0) has all-zero logits: argmax ties to class 0
    probs = F.softmax(logits, dim=1)
    assert conf[-1].item() == pytest.approx(probs[1, 2, 1, 2].item())
    assert pred.dtype == torch.uint8 and conf.dtype == torch.float32


def test_gather_without_ddp_is_the_identity():
    values = torch.arange(5)
    assert gather_concat(values, WorkerContext()) is values


def test_threshold_metrics_leave_out_classes_without_a_threshold():
    metrics = threshold_metrics(torch.tensor([0.5, math.inf, -math.inf]), ["a", "b", "c"])
    assert metrics == {"class_balanced/threshold/a": 0.5}


def test_rounds_schedule_alpha_and_keep_the_references_explicit():
    pipeline = load_pipeline(PIPELINE)
    labels = [s for s in pipeline.stages if s.kind == "class_balanced_label"]
    trains = [s for s in pipeline.stages if s.kind == "dst_train"]
    assert [round(s.alpha, 6) for s in labels] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert [s.gamma for s in trains] == [9.0] * 5
    assert labels[0].model_from == "supervised" and labels[1].model_from == "dst-r1-train"
    assert trains[1].init_from == "dst-r1-train" and trains[1].pseudo_labels == "dst-r2-label"


def test_class_balanced_label_rejects_the_softmax_threshold_key():
    with pytest.raises(ConfigError, match="use T for a global confidence threshold"):
        load_pipeline(PIPELINE, overrides=["stages.dst.stages.label.threshold=0.9"])
    with pytest.raises(ConfigError, match=r"stages\.dst\.stages\.label\.T: "):
        load_pipeline(PIPELINE, overrides=["stages.dst.stages.label.T=1.5"])


@pytest.mark.slow
def test_dst_cbc_pipeline_end_to_end(tmp_path, tracking_uri, small_synthetic):
    import mlflow
    from mlflow import MlflowClient

    from selftune.cli import main

    sets = [
        f"data.root={small_synthetic}", "data.eval_batch_size=16",
        "stages.supervised.epochs=1", "stages.supervised.steps_per_epoch=3", "stages.dst.rounds=2",
        "stages.dst.stages.train.epochs=1", "stages.dst.stages.train.steps_per_epoch=2",
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    code = main(["run", PIPELINE, *args, "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri, "--experiment", "dst"])
    assert code == 0
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["dst"], output_format="list")
    stages = {r.data.tags["selftune.stage"]: r for r in runs if r.data.tags["selftune.kind"] == "stage"}
    (pipeline,) = [r for r in runs if r.data.tags["selftune.kind"] == "pipeline"]
    assert sorted(stages) == ["dst-r1-label", "dst-r1-train", "dst-r2-label", "dst-r2-train", "supervised"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for name in ("dst-r1-label", "dst-r2-label"):
        metrics = stages[name].data.metrics
        for key in ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"):
            assert 0.0 <= metrics[key] <= 1.0
        assert any(key.startswith("pseudo_label/iou/") for key in metrics)
    # alpha 0.2 then 1.0: round 2 keeps every pixel, round 1 roughly a fifth
    assert stages["dst-r2-label"].data.metrics["pseudo_label/kept_fraction"] == pytest.approx(1.0)
    assert stages["dst-r1-label"].data.metrics["pseudo_label/kept_fraction"] < 0.5
    assert {"train/loss_seg", "train/loss_pseudo", "val/miou"} <= set(stages["dst-r2-train"].data.metrics)
    history = MlflowClient(tracking_uri).get_metric_history(pipeline.info.run_id, "dst/label/pseudo_label/miou")
    assert sorted(point.step for point in history) == [1, 2]
    label_history = MlflowClient(tracking_uri).get_metric_history(stages["dst-r2-label"].info.run_id, "pseudo_label/miou")
    assert [point.step for point in label_history] == [2]
