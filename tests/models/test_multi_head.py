"""multi_head: which parameters the two heads share (N-2, N-1), the branch kinds, checkpoints."""

from __future__ import annotations

import pytest
import torch

from selftune.models import build_model, load_checkpoint, save_checkpoint
from selftune.models.multi_head import multi_head_config, resolve_shared_blocks

NUM_CLASSES = 3


def _net(**options):
    torch.manual_seed(0)
    return build_model("multi_head", NUM_CLASSES, base="small_segnet", base_options={"width": 8}, **options)


def _grad_owners(model, output_index: int) -> set[str]:
    """Top-level module names (``blocks.<name>`` / ``head.<main|branch>``) that get a gradient from one head."""
    model.zero_grad(set_to_none=True)
    outputs = model(torch.randn(2, 3, 32, 32), both=True)
    outputs[output_index].square().mean().backward()
    return {".".join(name.split(".")[:2]) for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize(
    "spec, shared",
    [("N-2", 4), ("N-1", 5), ("N - 3", 3), (0, 0), (5, 5)],
)
def test_shared_blocks_are_counted_over_blocks_plus_head(spec, shared):
    assert resolve_shared_blocks(spec, 6) == shared


@pytest.mark.parametrize("spec", ["N-0", 6, -1, "N+1", "half"])
def test_invalid_shared_blocks_are_refused(spec):
    with pytest.raises(ValueError, match="shared_blocks"):
        resolve_shared_blocks(spec, 6)


def test_n_minus_2_shares_all_but_the_last_block_and_the_head():
    model = _net(shared_blocks="N-2").train()  # small_segnet: stem, layer1, layer2, context1, context2 + head
    assert model.shared == 4
    main = _grad_owners(model, 0)
    branch = _grad_owners(model, 1)
    shared = {"blocks.stem", "blocks.layer1", "blocks.layer2", "blocks.context1"}
    assert main == shared | {"blocks.context2", "head.main"}
    assert branch == shared | {"head.branch"}
    # The branch owns a copy of context2 and of the head: distinct tensors, same shapes.
    branch_params = dict(model.head["branch"].named_parameters())
    assert set(branch_params) == {f"0.{k}" for k, _ in model.blocks["context2"].named_parameters()} | {
        f"1.{k}" for k, _ in model.head["main"].named_parameters()
    }
    main_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("head.branch")}
    assert not main_ids & {id(p) for p in branch_params.values()}
    assert set(model.shared_parameter_names()) == {
        n for n, _ in model.named_parameters() if n.startswith(tuple(f"{s}." for s in shared))
    }


def test_n_minus_1_shares_every_block_and_owns_only_a_head():
    model = _net(shared_blocks="N-1").train()
    main, branch = _grad_owners(model, 0), _grad_owners(model, 1)
    blocks = {f"blocks.{name}" for name in model.blocks}
    assert main == blocks | {"head.main"}
    assert branch == blocks | {"head.branch"}
    assert len(model.head["branch"]) == 1  # a copy of the head only


def test_plain_forward_is_the_main_head_and_both_returns_two_maps():
    model = _net().eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        main, branch = model(x, both=True)
        assert torch.equal(model(x), main)
    assert main.shape == branch.shape == (2, NUM_CLASSES, 33, 33)


def test_projection_branch_gives_features_at_block_resolution():
    model = _net(shared_blocks="N-1", branch="projection", projection_dim=16).eval()
    with torch.no_grad():
        _, features = model(torch.randn(2, 3, 32, 32), both=True)
    assert features.shape == (2, 16, 8, 8)  # small_segnet has stride 4


def test_deeplabv2_n_minus_2_branch_owns_layer4_and_aspp():
    model = build_model("multi_head", 5, base="deeplabv2_resnet50", shared_blocks="N-2")
    assert list(model.blocks)[: model.shared] == ["stem", "layer1", "layer2", "layer3"]
    own_layer4, own_head = model.head["branch"]
    assert own_layer4 is not model.blocks["layer4"]
    assert [p.shape for p in own_layer4.parameters()] == [p.shape for p in model.blocks["layer4"].parameters()]
    assert type(own_head) is type(model.head["main"])


def test_checkpoint_rebuilds_with_pretrained_kept_out(tmp_path):
    config = multi_head_config("small_segnet", {"width": 8, "pretrained": "some-file"}, shared_blocks="N-1")
    assert config["options"]["pretrained"] == "some-file" and "pretrained" not in config["options"]["base_options"]
    model = _net(shared_blocks="N-1").eval()
    save_checkpoint(tmp_path / "ckpt", model, {**config, "num_classes": NUM_CLASSES})
    loaded, record = load_checkpoint(tmp_path / "ckpt")  # must not try to load "some-file"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x))
    assert record["name"] == "multi_head"
