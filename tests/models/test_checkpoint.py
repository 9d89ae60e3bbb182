"""Checkpoints rebuild their model from the folder alone; broken folders fail with DataError."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from selftune.errors import DataError
from selftune.models import BlockInfo, SegmentationNetwork, load_checkpoint, save_checkpoint
from selftune.models import registry

NAME = "tiny_checkpoint_net"


def tiny_net(num_classes: int, *, width: int = 4, pretrained: str | None = None) -> SegmentationNetwork:
    """Two blocks and a BatchNorm (buffers must round-trip too). ``pretrained`` must never be
    re-applied when a checkpoint is loaded, so asking for it here fails loudly."""
    if pretrained is not None:
        raise AssertionError(f"pretrained={pretrained!r} re-applied")
    blocks = [
        (BlockInfo("stem", width, 2), nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width))),
        (BlockInfo("body", width, 2), nn.Conv2d(width, width, 3, padding=1)),
    ]
    return SegmentationNetwork(blocks, nn.Conv2d(width, num_classes, 1), num_classes)


@pytest.fixture(autouse=True)
def tiny_model_registered(monkeypatch):
    # Registered only for the duration of each test, so the registry-wide smoke test never sees it.
    monkeypatch.setitem(registry._MODELS, NAME, tiny_net)


def trained_model() -> SegmentationNetwork:
    torch.manual_seed(0)
    model = tiny_net(3, width=6)
    model.train()
    model(torch.randn(2, 3, 9, 9))  # moves the BatchNorm running statistics away from their init
    return model.eval()


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = trained_model()
    config = {"name": NAME, "num_classes": 3, "options": {"width": 6}}
    folder = save_checkpoint(tmp_path / "ckpt", model, config, extra={"epoch": 4, "val_miou": 0.5})

    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]  # no temporary left behind
    assert json.loads((folder / "model.json").read_text()) == {**config, "epoch": 4, "val_miou": 0.5}

    loaded, record = load_checkpoint(folder)
    assert record == {**config, "epoch": 4, "val_miou": 0.5}
    assert loaded.num_classes == 3 and [b.name for b in loaded.block_info] == ["stem", "body"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))


def test_ddp_wrapper_is_unwrapped(tmp_path):
    model = trained_model()
    save_checkpoint(tmp_path, nn.DataParallel(model), {"name": NAME, "num_classes": 3, "options": {"width": 6}})
    keys = torch.load(tmp_path / "model.pt", weights_only=True).keys()
    assert keys == model.state_dict().keys()  # no "module." prefix


def test_loaded_record_can_be_saved_again_and_pretrained_is_not_reapplied(tmp_path):
    config = {"name": NAME, "num_classes": 2, "options": {"pretrained": "imagenet.pth"}}
    save_checkpoint(tmp_path / "first", tiny_net(2), config, extra={"epoch": 1})
    model, record = load_checkpoint(tmp_path / "first")  # tiny_net would raise if pretrained came back
    save_checkpoint(tmp_path / "second", model, record, extra={"epoch": 2})
    assert json.loads((tmp_path / "second" / "model.json").read_text()) == {**config, "epoch": 2}


def test_extra_may_not_overwrite_the_model_config(tmp_path):
    with pytest.raises(ValueError, match=r"extra keys \['name'\] would overwrite the model config"):
        save_checkpoint(tmp_path, tiny_net(2), {"name": NAME, "num_classes": 2}, extra={"name": "other"})
    assert not (tmp_path / "model.json").exists()


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"checkpoint config .*nowhere[/\\]model\.json does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_corrupt_files_are_data_errors_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, tiny_net(2), {"name": NAME, "num_classes": 2})
    (tmp_path / "model.pt").write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"checkpoint weights .*model\.pt are unreadable"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(DataError, match=r"checkpoint config .*model\.json is unreadable"):
        load_checkpoint(tmp_path)


def test_weights_of_another_model_are_a_data_error(tmp_path):
    save_checkpoint(tmp_path, tiny_net(2), {"name": NAME, "num_classes": 2})
    (tmp_path / "model.json").write_text(json.dumps({"name": NAME, "num_classes": 5, "options": {}}))
    with pytest.raises(DataError, match=r"model\.pt do not fit model 'tiny_checkpoint_net': size mismatch for head\.weight"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"name": "no_such_model", "num_classes": 2}))
    with pytest.raises(DataError, match=r"model\.json cannot be rebuilt: unknown model 'no_such_model'; available"):
        load_checkpoint(tmp_path)


def test_missing_keys_are_named(tmp_path):
    save_checkpoint(tmp_path, tiny_net(2), {"name": NAME, "num_classes": 2})
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    del state["head.bias"]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(DataError, match=r"model\.pt do not fit model 'tiny_checkpoint_net': missing 1 keys \(head\.bias\)$"):
        load_checkpoint(tmp_path)
