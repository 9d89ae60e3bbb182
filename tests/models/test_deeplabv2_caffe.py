"""DeepLab's own ResNet-101 (the COCO-pretrained DeepLabv2 the papers start from) and its checkpoint keys."""

from __future__ import annotations

import pytest
import torch

from selftune.errors import ConfigError
from selftune.models import build_model
from selftune.models.deeplabv2_caffe import CAFFE_BGR_MEAN, CaffeInput, _deeplab_name, deeplab_caffe_key

TINY = {"base_width": 4}  # the real network is 64 wide; the layout (and every key) is the same


def _tiny(num_classes: int = 21, seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_model("deeplabv2_caffe_resnet101", num_classes, **TINY, **options)


def _as_deeplab_checkpoint(model, prefix: str = "Scale.") -> dict[str, torch.Tensor]:
    """The model's weights under DeepLab's key names, as the COCO .pth (no num_batches_tracked)."""
    names = {"blocks.stem.": "", "blocks.": "", "head.": "layer5."}
    checkpoint = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = next(p for p in names if key.startswith(p))
        checkpoint[prefix + names[ours] + key.removeprefix(ours)] = value.clone()
    return checkpoint


def test_stride_on_the_first_1x1_and_every_block_of_layer3_4_dilated():
    model = _tiny()
    first2 = model.blocks["layer2"][0]
    assert (first2.conv1.stride, first2.conv2.stride) == ((2, 2), (1, 1))
    assert all(block.conv2.dilation == (2, 2) and block.conv1.stride == (1, 1) for block in model.blocks["layer3"])
    assert all(block.conv2.dilation == (4, 4) for block in model.blocks["layer4"])
    assert len(model.blocks["layer3"]) == 23
    # torchvision's v1.5 strides on the 3x3 instead, with the same parameters
    with torch.device("meta"):
        v15 = build_model("deeplabv2_resnet101", 21)
    assert v15.blocks["layer2"][0].conv2.stride == (2, 2)
    assert [k for k in v15.state_dict()] == [k for k in _tiny().state_dict()]


def test_caffe_input_is_bgr_0_255_minus_the_caffe_mean():
    rgb = torch.tensor([10.0, 20.0, 30.0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = ((rgb / 255 - mean) / std).view(1, 3, 1, 1)  # what the loaders hand over
    out = CaffeInput()(normalised).view(3)
    expected = [30 - CAFFE_BGR_MEAN[0], 20 - CAFFE_BGR_MEAN[1], 10 - CAFFE_BGR_MEAN[2]]
    assert out.tolist() == pytest.approx(expected, abs=1e-4)
    assert list(CaffeInput().state_dict()) == []  # no keys: checkpoints stay those of the network


def test_key_names_are_deeplabs():
    checkpoint = _as_deeplab_checkpoint(_tiny())
    for key in ("Scale.conv1.weight", "Scale.bn1.running_mean", "Scale.layer1.0.downsample.0.weight",
                "Scale.layer1.0.downsample.1.running_var", "Scale.layer3.22.conv3.weight",
                "Scale.layer5.conv2d_list.3.bias"):
        assert key in checkpoint
    # the COCO file holds 528 tensors for 21 classes (DST-CBC's convert_coco_resnet101.py counts them)
    assert len(checkpoint) == 528
    assert deeplab_caffe_key("Scale.layer5.conv2d_list.0.weight") == "head.conv2d_list.0.weight"
    assert deeplab_caffe_key("bn1.weight") == "blocks.stem.bn1.weight"
    assert deeplab_caffe_key("Scale.fc.weight") is None
    assert all(_deeplab_name(deeplab_caffe_key(k)) == k.removeprefix("Scale.") for k in checkpoint)


@pytest.mark.parametrize("prefix", ["Scale.", ""])
def test_a_written_deeplab_checkpoint_loads_every_key(tmp_path, prefix):
    source = _tiny(seed=1)
    path = tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth"
    torch.save(_as_deeplab_checkpoint(source, prefix), path)
    loaded = _tiny(seed=2, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    # 19 classes: the 21-class head does not fit and stays freshly initialised, the backbone loads
    city = _tiny(num_classes=19, seed=2, pretrained=str(path))
    assert torch.equal(city.blocks["layer4"][2].conv3.weight, source.blocks["layer4"][2].conv3.weight)
    assert city.head.conv2d_list[0].weight.shape[0] == 19


def test_a_mismatching_checkpoint_is_refused_naming_the_first_keys(tmp_path):
    checkpoint = _as_deeplab_checkpoint(_tiny())
    del checkpoint["Scale.layer2.0.conv1.weight"]
    checkpoint["Scale.layer6.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    named = r"missing keys 1 \(layer2\.0\.conv1\.weight\).*unexpected keys 1 \(Scale\.layer6\.extra\.weight\)"
    with pytest.raises(ConfigError, match=named):
        _tiny(pretrained=str(path))
    checkpoint = _as_deeplab_checkpoint(_tiny())
    checkpoint["Scale.conv1.weight"] = torch.zeros(5, 3, 7, 7)
    torch.save(checkpoint, path)
    wrong = r"wrong-shaped keys 1 \(Scale\.conv1\.weight \(5, 3, 7, 7\) != \(4, 3, 7, 7\)"
    with pytest.raises(ConfigError, match=wrong):
        _tiny(pretrained=str(path))
    # a torchvision file is not a DeepLab one: its fc.* has no place here
    torch.save({**_as_deeplab_checkpoint(_tiny(), ""), "fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ConfigError, match=r"unexpected keys 1 \(fc\.weight\)"):
        _tiny(pretrained=str(path))


def test_deeplabv2_is_the_resnet101_short_name():
    with torch.device("meta"):
        short, full = build_model("deeplabv2", 3), build_model("deeplabv2_resnet101", 3)
    assert [(k, v.shape) for k, v in short.state_dict().items()] == [(k, v.shape) for k, v in full.state_dict().items()]
