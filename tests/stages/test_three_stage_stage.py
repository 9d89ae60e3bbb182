"""multi_task stage (three-stage self-training) and the MeanTeacher it shares with U2PL.

(Named ``test_three_stage_stage.py``: ``tests/methods/test_three_stage.py`` already exists and test
file names must be unique across the tree.)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from selftune.cli import main
from selftune.config import load_pipeline
from selftune.data.synthetic import generate_synthetic
from selftune.models import build_model, load_checkpoint
from selftune.data import TwoStreamBatch
from selftune.engine.loop import TrainState
from selftune.stages.teacher import EmaUpdate, MeanTeacher
from selftune.stages.three_stage import MultiTaskStage, ema_decay_of, multi_task_terms

REPO = Path(__file__).resolve().parents[2]


def _pair(decay: float = 0.5, **options) -> MeanTeacher:
    torch.manual_seed(0)
    student = build_model("multi_head", 3, base="small_segnet", base_options={"width": 8}, **options)
    return MeanTeacher(student, lambda updates, epoch: decay)


def test_teacher_moves_by_ema_after_each_optimizer_step():
    pair = _pair(decay=0.75).train()
    optimizer = torch.optim.SGD([p for p in pair.parameters() if p.requires_grad], lr=0.1)
    name = "head.main.2.weight"
    before = dict(pair.teacher.named_parameters())[name].clone()
    pair(torch.randn(2, 3, 32, 32)).mean().backward()
    optimizer.step()
    student = dict(pair.student.named_parameters())[name].detach().clone()
    assert not torch.equal(student, before)  # the step moved the student
    assert torch.equal(dict(pair.teacher.named_parameters())[name], before)  # the teacher did not train
    EmaUpdate().after_step(TrainState(epochs=1, steps_per_epoch=1, epoch=1, step=1), pair)  # t = 0.75 t + 0.25 s
    assert torch.allclose(dict(pair.teacher.named_parameters())[name], 0.75 * before + 0.25 * student)
    assert pair.updates == 1
    pair.eval()  # switching to evaluation moves nothing
    assert pair.updates == 1 and torch.allclose(dict(pair.teacher.named_parameters())[name], 0.75 * before + 0.25 * student)


def test_teacher_is_the_checkpoint_and_the_eval_forward():
    pair = _pair()
    assert set(pair.state_dict()) == set(pair.student.state_dict())
    with torch.no_grad():
        pair.student.head["main"][2].weight.add_(1.0)  # student and teacher now differ
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(pair.eval()(x), pair.teacher(x))
        assert not torch.equal(pair.teacher(x), pair.student.eval()(x))
    assert all(not p.requires_grad for p in pair.teacher.parameters())


def _stage(**overrides) -> MultiTaskStage:
    return MultiTaskStage(name="s2", pseudo_labels="pl", epochs=2, **overrides)


def _batch(n_l: int = 2, n_u: int = 3, size: int = 32) -> TwoStreamBatch:
    torch.manual_seed(1)
    return TwoStreamBatch(
        {"image": torch.randn(n_l, 3, size, size), "mask": torch.randint(0, 3, (n_l, size, size)),
         "valid": torch.ones(n_l, size, size, dtype=torch.bool)},
        {"image": torch.randn(n_u, 3, size, size), "image_strong": torch.randn(n_u, 3, size, size),
         "mask": torch.randint(0, 3, (n_u, size, size)), "valid": torch.ones(n_u, size, size, dtype=torch.bool)},
    )


def test_loss_terms_are_weighted_and_reach_the_right_heads():
    pair = _pair().train()
    compute = multi_task_terms(_stage(lambda1=0.0, lambda2=2.0), torch.Generator().manual_seed(0))
    terms = compute(pair, _batch())
    assert set(terms) == {"seg", "con", "pl"} and terms["con"].item() == 0.0
    terms["pl"].backward()  # L_pl trains the branch and the shared blocks, never the main head
    grads = {n for n, p in pair.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("head.branch.") for n in grads) and any(n.startswith("blocks.stem.") for n in grads)
    assert not any(n.startswith(("head.main.", "blocks.context2.")) for n in grads)


def test_pl_term_equals_cross_entropy_on_the_moved_masks_without_geometry():
    """With the identity transform (no flip, zoom 1) L_pl is plain CE of the branch on [y_l; ŷ_u]."""
    pair = _pair().train()
    stage = _stage(lambda1=1.0, lambda2=1.0, flip_prob=0.0, zoom_range=(1.0, 1.0), max_rotation_degrees=0.0,
                   max_shear=0.0, max_translate=0.0, cutout_holes=0)
    batch = _batch()
    terms = multi_task_terms(stage, torch.Generator().manual_seed(0))(pair, batch)
    with torch.no_grad():
        main, branch = pair.student(batch.joint("image", "image_strong"), both=True)
    masks = batch.joint("mask")
    assert torch.allclose(terms["pl"], nn.functional.cross_entropy(branch, masks), atol=1e-5)
    assert torch.allclose(terms["seg"], nn.functional.cross_entropy(main[:2], batch.labelled["mask"]), atol=1e-5)
    teacher_labels = pair.teacher.eval()(batch.joint("image")).argmax(1)
    assert torch.allclose(terms["con"], nn.functional.cross_entropy(main, teacher_labels), atol=1e-5)


def test_cutout_cuts_the_students_image_but_not_its_targets():
    """With the identity geometry and Cutout on, L_pl is CE of the branch on the cut image against
    the uncut masks: the target keeps its labels where the image lost its pixels."""
    pair = _pair().train()
    stage = _stage(lambda1=1.0, lambda2=1.0, flip_prob=0.0, zoom_range=(1.0, 1.0), max_rotation_degrees=0.0,
                   max_shear=0.0, max_translate=0.0, cutout_holes=2, cutout_size=8)
    batch = _batch()
    terms = multi_task_terms(stage, torch.Generator().manual_seed(0))(pair, batch)
    # the same draws: the (no-op) geometric transform first, then the cutout squares
    from selftune.methods.three_stage import apply_cutout, cutout_mask, sample_geometric_transform

    generator = torch.Generator().manual_seed(0)
    sample_geometric_transform(5, generator, flip_prob=0.0, scale_range=(1.0, 1.0))
    cut = cutout_mask(5, 32, 32, generator, holes=2, size=8)
    assert cut.any() and not cut.all()
    with torch.no_grad():
        _, branch = pair.student(apply_cutout(batch.joint("image", "image_strong"), cut), both=True)
    assert torch.allclose(terms["pl"], nn.functional.cross_entropy(branch, batch.joint("mask")), atol=1e-5)


def test_the_paper_geometry_is_on_by_default():
    stage = _stage()
    assert (stage.max_rotation_degrees, stage.max_shear, stage.cutout_holes) == (30.0, 0.3, 3)
    assert stage.ops_with_replacement and stage.strong_on_labelled


def test_ema_decay_schedule_is_read_per_epoch():
    stage = _stage(ema_decay={"shape": "list", "values": [0.9, 0.99]})
    decay = ema_decay_of(stage)
    assert [decay(u, epoch) for u, epoch in ((0, 0), (2, 0), (3, 1), (5, 1))] == [0.9, 0.9, 0.99, 0.99]


def test_config_requires_the_pseudo_labels_and_declares_them_upstream():
    with pytest.raises(Exception, match="pseudo_labels"):
        MultiTaskStage(name="s2")
    assert _stage(init_from="sup").upstream() == {"init": "sup", "pseudo_labels": "pl"}


def test_bad_ema_schedule_is_a_config_error():
    with pytest.raises(Exception, match="ema_decay"):
        _stage(ema_decay={"shape": "linear", "start": 0.9})


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return generate_synthetic(tmp_path / "tiny", num_train=40, num_val=8)


def _runs(uri: str, experiment: str):
    mlflow.set_tracking_uri(uri)
    return {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")}


@pytest.mark.slow
def test_three_stage_pipeline_end_to_end(tmp_path, tracking_uri, tiny_dataset):
    sets = [f"data.dataset=folder", f"data.root={tiny_dataset}", "data.labelled=8", "data.eval_batch_size=16"]
    sets += ["stages.supervised.epochs=1", "stages.supervised.steps_per_epoch=2", "stages.supervised.batch_size=4"]
    for stage in ("stage2", "stage3"):
        sets += [f"stages.{stage}.epochs=2", f"stages.{stage}.steps_per_epoch=1", f"stages.{stage}.batch_size=2",
                 f"stages.{stage}.unlabelled_batch_size=2"]
    args = [a for s in sets for a in ("--set", s)]
    pipeline = REPO / "pipelines" / "three_stage.yaml"
    load_pipeline(pipeline)  # the shipped defaults validate
    code = main(["run", str(pipeline), *args, "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri, "--experiment", "ts"])
    assert code == 0
    runs = _runs(tracking_uri, "ts")
    stages = ["supervised", "pseudo_label_1", "stage2", "pseudo_label_2", "stage3", "pseudo_label_3"]
    assert all(runs[name].info.status == "FINISHED" for name in stages)
    for name in ("stage2", "stage3"):
        assert {"val/miou", "train/loss_seg", "train/loss_con", "train/loss_pl"} <= set(runs[name].data.metrics)
    for name in ("pseudo_label_1", "pseudo_label_2", "pseudo_label_3"):
        metrics = runs[name].data.metrics
        assert {"pseudo_label/miou", "pseudo_label/kept_fraction", "pseudo_label/class_coverage"} <= set(metrics)
    # Stage 2 / 3 checkpoints are multi-head teachers with N-2 / N-1 shared modules.
    shared = {}
    for name in ("stage2", "stage3"):
        folder = next((tmp_path / "out").glob(f"*-{name}/checkpoint"))
        model, record = load_checkpoint(folder)
        shared[name] = model.shared
        assert record["name"] == "multi_head"
    assert shared == {"stage2": 4, "stage3": 5}
