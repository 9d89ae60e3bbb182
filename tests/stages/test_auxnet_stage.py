"""Auxiliary confidence network stages: the network, its checkpoint, the AUC, the loss terms,
the labelling rule, the pipeline end to end."""

from __future__ import annotations

import math

import pytest
import torch

from support import REPO
from selftune.config import load_pipeline
from selftune.engine.context import WorkerContext
from selftune.errors import ConfigError
from selftune.methods.auxnet import AuxiliaryConfidenceNet, histogram_auc
from selftune.stages.auxnet import aux_loss_terms, evaluate_aux, load_aux, save_aux

PIPELINE = str(REPO / "pipelines" / "auxnet.yaml")


class Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("size", [(64, 64), (33, 50), (5, 7)])
def test_aux_net_returns_one_logit_per_pixel_at_any_size(size):
    net = AuxiliaryConfidenceNet(8, channels=[4, 4, 4], aspp_channels=2, aspp_dilations=[1, 2])
    assert net(torch.rand(2, 8, *size)).shape == (2, 1, *size)


def test_aux_net_needs_two_strided_layers():
    with pytest.raises(ValueError, match="needs >= 3 layers"):
        AuxiliaryConfidenceNet(8, channels=[4, 4])


def test_histogram_auc_by_hand():
    # positives in bins 1 and 2, negatives in bins 0 and 1: pairs (1,0)=1, (1,1)=1/2, (2,0)=1, (2,1)=1
    assert histogram_auc(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0])) == pytest.approx(3.5 / 4)
    assert histogram_auc(torch.tensor([0, 0, 2]), torch.tensor([3, 0, 0])) == 1.0
    assert math.isnan(histogram_auc(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0])))


def test_checkpoint_round_trip(tmp_path):
    architecture = {"in_channels": 3, "channels": [4, 4, 4], "aspp_channels": 2, "aspp_dilations": [1]}
    net = AuxiliaryConfidenceNet(**architecture).eval()
    save_aux(tmp_path, net, {"architecture": architecture, "segmentation_checkpoint": "x"})
    loaded, record = load_aux(tmp_path, torch.device("cpu"))
    probs = torch.rand(1, 3, 9, 9)
    assert torch.equal(loaded(probs), net(probs)) and record["segmentation_checkpoint"] == "x"


def test_aux_loss_targets_the_frozen_networks_correctness():
    # seg predicts class 0 at pixel 0 (right) and class 1 at pixel 1 (wrong, label 0).
    seg_logits = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]]]])  # (1, 2, 1, 2)
    batch = {"image": torch.zeros(1, 3, 1, 2), "mask": torch.tensor([[[0, 0]]])}
    aux = Fixed(torch.zeros(1, 1, 1, 2))  # a = 1/2 everywhere: -log a = -log(1 - a) = ln 2
    frequency = torch.tensor([1.0, 0.0])  # class 0 has all the pixels -> W = 1 / ln(2.04)
    terms = aux_loss_terms(Fixed(seg_logits), WorkerContext(), frequency, 1.04, None)(aux, batch)
    # gamma for class 0 = #neg / #pos = 1; loss = W (1 ln 2 + ln 2) / 2 pixels
    assert terms["aux"].item() == pytest.approx(math.log(2) / math.log(2.04))


def test_evaluate_aux_scores_correctness_prediction():
    seg_logits = torch.tensor([[[[4.0, -4.0, 4.0]], [[-4.0, 4.0, -4.0]]]])  # predicts 0, 1, 0
    loader = [{"image": torch.zeros(1, 3, 1, 3), "mask": torch.tensor([[[0, 0, 255]]])}]  # right, wrong, ignored
    aux = Fixed(torch.tensor([[[[3.0, -3.0, -3.0]]]]))  # trusts pixel 0 only
    metrics = evaluate_aux(Fixed(seg_logits), aux, loader, WorkerContext())
    assert metrics == {"aux/val_accuracy": 1.0, "aux/val_auc": 1.0, "aux/val_correct_fraction": 0.5}


def test_confidence_label_requires_the_aux_stage_and_rejects_threshold():
    pipeline = load_pipeline(PIPELINE)
    label = pipeline.stage("confidence_label")
    assert label.upstream() == {"model": "supervised", "aux_model": "auxnet"}
    assert pipeline.stage("auxnet").upstream() == {"model": "supervised"}
    with pytest.raises(ConfigError, match="the auxiliary confidence threshold is t_aux"):
        load_pipeline(PIPELINE, overrides=["stages.confidence_label.threshold=0.5"])
    with pytest.raises(ConfigError, match="stages.auxnet.c"):
        load_pipeline(PIPELINE, overrides=["stages.auxnet.c=1.0"])


@pytest.mark.slow
def test_auxnet_pipeline_end_to_end(tmp_path, tracking_uri, small_synthetic):
    import mlflow
    from mlflow import MlflowClient

    from selftune.cli import main

    sets = [
        f"data.root={small_synthetic}", "data.eval_batch_size=16",
        "stages.supervised.epochs=1", "stages.supervised.steps_per_epoch=3",
        "stages.auxnet.epochs=2", "stages.auxnet.steps_per_epoch=2",
        "stages.confidence_label.t_aux=0.0",  # keep every pixel: a barely trained aux net is rarely 50 % sure
        "stages.self_train.epochs=1", "stages.self_train.steps_per_epoch=2",
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    out = tmp_path / "out"
    code = main(["run", PIPELINE, *args, "--out", str(out), "--tracking-uri", tracking_uri, "--experiment", "aux"])
    assert code == 0
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["aux"], output_format="list")
    stages = {r.data.tags["selftune.stage"]: r for r in runs if r.data.tags["selftune.kind"] == "stage"}
    assert sorted(stages) == ["auxnet", "confidence_label", "self_train", "supervised"]
    assert all(r.info.status == "FINISHED" for r in runs)
    aux = stages["auxnet"]
    assert {"train/loss", "train/loss_aux", "aux/val_accuracy", "aux/val_auc"} <= set(aux.data.metrics)
    history = MlflowClient(tracking_uri).get_metric_history(aux.info.run_id, "train/loss")
    assert sorted({point.step for point in history}) == [1, 2]  # per epoch (+ the kept epoch again at the end)
    assert (out / "1-auxnet" / "checkpoint" / "auxnet.pt").is_file()
    labelling = stages["confidence_label"].data.metrics
    for key in ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"):
        assert 0.0 <= labelling[key] <= 1.0
    assert {"train/loss_pseudo", "val/miou"} <= set(stages["self_train"].data.metrics)
