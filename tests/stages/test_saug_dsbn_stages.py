"""Yuan et al. student stage: DSBN routing, the normal BN alone at evaluation, plain checkpoints,
SCL/CE switch; one end-to-end run of pipelines/saug_dsbn_scl.yaml.

(Named ``*_stages`` because ``tests/methods/test_saug_dsbn.py`` already exists.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support import REPO, two_stream
from selftune.cli import main
from selftune.methods.saug_dsbn import DualBatchNorm2d, convert_to_dsbn, self_correction_loss
from selftune.models import build_model, load_checkpoint, save_checkpoint
from selftune.data import two_streams
from selftune.stages.saug_dsbn import plain_network, student_terms

PIPELINE = REPO / "pipelines" / "saug_dsbn_scl.yaml"


def _batch(weak: float, strong: float) -> dict[str, torch.Tensor]:
    images = torch.cat([torch.full((2, 2, 3, 3), weak), torch.full((2, 2, 3, 3), strong)])
    images[:, 1] *= -1  # two "classes"; class 0 wins wherever the value is positive
    return {"image": images, "mask": torch.zeros(4, 3, 3, dtype=torch.long), "n_labelled": torch.tensor(2)}


def test_labelled_images_update_the_normal_bn_and_pseudo_labelled_the_strong_one():
    model = convert_to_dsbn(nn.Sequential(nn.BatchNorm2d(2)))
    model.train()
    student_terms(1.0, dsbn=True, scl=True)(model, two_stream(_batch(weak=1.0, strong=5.0)))
    dual = model[0]
    # momentum 0.1 from running_mean 0: the normal BN saw only the labelled 1s, the strong BN only the 5s.
    assert torch.allclose(dual.normal.running_mean, torch.tensor([0.1, -0.1]))
    assert torch.allclose(dual.strong.running_mean, torch.tensor([0.5, -0.5]))


def test_without_dsbn_one_bn_sees_the_whole_batch():
    model = nn.Sequential(nn.BatchNorm2d(2)).train()
    student_terms(1.0, dsbn=False, scl=True)(model, two_stream(_batch(weak=1.0, strong=5.0)))
    assert torch.allclose(model[0].running_mean, torch.tensor([0.3, -0.3]))


def test_scl_switch_chooses_the_pseudo_loss():
    model = nn.Identity()
    batch = _batch(weak=0.3, strong=0.7)
    logits = batch["image"]
    with_scl = student_terms(2.0, dsbn=False, scl=True)(model, two_stream(batch))
    with_ce = student_terms(2.0, dsbn=False, scl=False)(model, two_stream(batch))
    assert with_scl["pseudo"].item() == pytest.approx(2.0 * self_correction_loss(logits[2:], batch["mask"][2:]).item())
    assert with_ce["pseudo"].item() == pytest.approx(2.0 * F.cross_entropy(logits[2:], batch["mask"][2:]).item())
    assert with_scl["seg"].item() == pytest.approx(F.cross_entropy(logits[:2], batch["mask"][:2]).item())


def test_the_strong_view_replaces_the_pseudo_labelled_image():
    labelled = [{"image": torch.zeros(2, 3, 4, 4), "mask": torch.zeros(2, 4, 4, dtype=torch.long)}]
    pseudo = [{"image": torch.ones(3, 3, 4, 4), "image_strong": torch.full((3, 3, 4, 4), 7.0),
               "mask": torch.ones(3, 4, 4, dtype=torch.long)}]
    (batch,) = two_streams(iter(labelled), iter(pseudo))
    seen = {}
    terms = student_terms(1.0, dsbn=False, scl=False)
    terms(lambda images: seen.setdefault("images", images) * 0, batch)
    assert batch.n_labelled == 2 and seen["images"].shape[0] == 5
    assert (seen["images"][2:] == 7.0).all() and (seen["images"][:2] == 0.0).all()


def _trained_dsbn_network() -> nn.Module:
    torch.manual_seed(0)
    model = convert_to_dsbn(build_model("small_segnet", 3))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    student_terms(1.0, dsbn=True, scl=True)(model, two_stream({"image": torch.cat([x, 3 * x + 2]), "mask": torch.zeros(8, 32, 32, dtype=torch.long), "n_labelled": torch.tensor(4)}))
    for dual in (m for m in model.modules() if isinstance(m, DualBatchNorm2d)):
        dual.strong.weight.data.mul_(5.0)  # make the strong branch clearly different
    return model


def test_evaluation_never_uses_the_strong_bn():
    model = _trained_dsbn_network().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    for dual in (m for m in model.modules() if isinstance(m, DualBatchNorm2d)):
        dual.strong.weight.data.fill_(100.0)
        dual.strong.running_mean.fill_(50.0)
        dual.strong_from = 0  # even if a forward asked for it
    assert torch.equal(model(x), before)


def test_the_saved_checkpoint_reloads_as_the_plain_network(tmp_path):
    model = _trained_dsbn_network().eval()
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, model, {"name": "small_segnet", "num_classes": 3}, extra={"val_miou": 0.5, "epoch": 2})
    with pytest.raises(Exception):
        load_checkpoint(folder)  # the DSBN network itself is not loadable as a plain model
    # What the stage's best-checkpoint hook saves: the exported plain copy; training goes on with DSBN.
    save_checkpoint(folder, plain_network(model), {"name": "small_segnet", "num_classes": 3}, extra={"val_miou": 0.5, "epoch": 2})
    assert any(isinstance(m, DualBatchNorm2d) for m in model.modules())
    plain, record = load_checkpoint(folder)
    assert not any(isinstance(m, DualBatchNorm2d) for m in plain.modules())
    assert record["val_miou"] == 0.5 and record["epoch"] == 2
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(plain.eval()(x), model(x), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from selftune.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("saug")
    data = generate_synthetic(root / "data", num_train=60, num_val=16)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = ["data.root=" + str(data), "data.labelled=8", "stages.teacher.epochs=1", "stages.teacher.steps_per_epoch=2",
            "stages.saug.stages.0.scales=[0.75, 1.0]", "stages.saug.stages.1.epochs=1",
            "stages.saug.stages.1.steps_per_epoch=2"]
    args = [arg for item in sets for arg in ("--set", item)]
    code = main(["run", str(PIPELINE), *args, "--out", str(root / "out"), "--tracking-uri", uri, "--experiment", "saug"])
    return {"code": code, "uri": uri, "out": root / "out"}


@pytest.mark.slow
def test_saug_dsbn_scl_end_to_end(tiny_run):
    import mlflow

    assert tiny_run["code"] == 0
    mlflow.set_tracking_uri(tiny_run["uri"])
    runs = mlflow.search_runs(experiment_names=["saug"], filter_string="tags.`selftune.kind` = 'stage'", output_format="list")
    by_name = {run.data.tags["selftune.stage"]: run for run in runs}
    assert sorted(by_name) == ["saug-r1-label", "saug-r1-student", "saug-r2-label", "saug-r2-student", "teacher"]
    assert all(run.info.status == "FINISHED" for run in runs)
    for name in ("saug-r1-label", "saug-r2-label"):
        metrics = by_name[name].data.metrics
        for key in ("pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"):
            assert 0.0 <= metrics[key] <= 1.0
    assert {"val/miou", "train/loss_seg", "train/loss_pseudo"} <= set(by_name["saug-r2-student"].data.metrics)
    # Round 2 labels with round 1's student, whose checkpoint must load as a plain network.
    student = Path(by_name["saug-r1-student"].data.tags["selftune.output_dir"]) / "checkpoint"
    model, _ = load_checkpoint(student)
    assert not any(isinstance(m, DualBatchNorm2d) for m in model.modules())
