from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selftune.data import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    DatasetIndex,
    Sample,
    available_layouts,
    open_dataset,
    read_mask,
)
from selftune.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------- folder


def test_folder_lists_samples_in_split_order_with_their_files(folder_root):
    index = open_dataset("folder", folder_root)
    assert isinstance(index, DatasetIndex)
    assert index.name == "folder" and index.root == folder_root
    assert index.classes == ["a", "b", "c"] and index.num_classes == 3
    assert [s.id for s in index.train] == ["t0", "t1", "t2", "t3"]  # the trailing blank line is ignored
    assert [s.id for s in index.val] == ["v0", "v1"]
    assert index.train[0] == Sample("t0", folder_root / "images" / "t0.png", folder_root / "masks" / "t0.png")
    assert index.train[3].image == folder_root / "images" / "t3.jpg"
    assert index.label_map is None


def test_folder_without_classes_txt_needs_num_classes(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", train=["a"], val=["b"], classes=None)
    with pytest.raises(ConfigError, match=r"has no classes\.txt; give its number of classes as option num_classes"):
        open_dataset("folder", root)
    index = open_dataset("folder", root, num_classes=4)
    assert index.classes == ["class_0", "class_1", "class_2", "class_3"]


def test_folder_num_classes_must_agree_with_classes_txt(folder_root):
    with pytest.raises(ConfigError, match=r"num_classes=5 disagrees with the 3 classes in .*classes\.txt"):
        open_dataset("folder", folder_root, num_classes=5)


def test_missing_root_is_a_one_line_data_error(tmp_path):
    missing = tmp_path / "x" / "y"
    with pytest.raises(DataError, match=rf"^dataset root {missing} does not exist$"):
        open_dataset("folder", missing)


def test_id_without_image_names_split_file_id_and_path(folder_root):
    (folder_root / "images" / "t1.png").unlink()
    with pytest.raises(DataError, match=r"splits/train\.txt lists id 't1' but there is no image .*images/t1\.png"):
        open_dataset("folder", folder_root)


def test_id_without_mask_names_split_file_id_and_path(folder_root):
    (folder_root / "masks" / "v1.png").unlink()
    with pytest.raises(DataError, match=r"splits/val\.txt lists id 'v1' but its mask .*masks/v1\.png does not exist"):
        open_dataset("folder", folder_root)


def test_train_id_without_mask_is_an_unlabelled_sample(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", train=["t0", "t1", "t2"], val=["v0"], unmasked=("t1",))
    index = open_dataset("folder", root)
    assert [s.id for s in index.train] == ["t0", "t1", "t2"]
    assert index.train[1] == Sample("t1", root / "images" / "t1.png", None)
    assert index.train[0].mask == root / "masks" / "t0.png" and index.train[2].mask == root / "masks" / "t2.png"
    assert index.val[0].mask == root / "masks" / "v0.png"


def test_unmasked_train_id_still_needs_its_image(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", train=["t0", "t1"], val=["v0"], unmasked=("t1",))
    (root / "images" / "t1.png").unlink()
    with pytest.raises(DataError, match=r"splits/train\.txt lists id 't1' but there is no image .*images/t1\.png"):
        open_dataset("folder", root)


def test_val_id_without_mask_is_still_an_error(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", train=["t0"], val=["v0", "v1"], unmasked=("t0", "v1"))
    with pytest.raises(DataError, match=r"splits/val\.txt lists id 'v1' but its mask .*masks/v1\.png does not exist"):
        open_dataset("folder", root)


def test_folder_where_a_train_mask_belongs_is_an_error(folder_root):
    (folder_root / "masks" / "t2.png").unlink()
    (folder_root / "masks" / "t2.png").mkdir()
    with pytest.raises(DataError, match=r"train\.txt lists id 't2' but its mask .*masks/t2\.png is not a file"):
        open_dataset("folder", folder_root)


def test_missing_split_file_is_named(folder_root):
    (folder_root / "splits" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"split file .*splits/val\.txt does not exist"):
        open_dataset("folder", folder_root)


def test_unknown_kind_lists_the_available_ones():
    message = r"unknown dataset 'coco'; available datasets are: cityscapes, folder, synthetic, voc"
    with pytest.raises(ConfigError, match=message):
        open_dataset("coco", "/tmp")


def test_unknown_option_lists_the_valid_ones(folder_root):
    with pytest.raises(ConfigError, match=r"dataset 'folder' has no option 'classes'; its options are: num_classes"):
        open_dataset("folder", folder_root, classes=3)
    with pytest.raises(ConfigError, match=r"dataset 'voc' has no option 'seed'; its options are: none"):
        open_dataset("voc", folder_root, seed=1)


def test_root_is_required_except_for_synthetic():
    with pytest.raises(ConfigError, match=r"dataset 'folder' needs a root folder"):
        open_dataset("folder", None)


# ---------------------------------------------------------------------------------------------- VOC

TRAIN = ["2007_000032", "2008_000002", "2007_000039"]
VAL = ["2007_000033", "2007_000042"]


@pytest.mark.parametrize("level", ["VOC2012", "VOCdevkit", "base"])
def test_voc_opens_from_voc2012_or_its_parents(tmp_path, make_voc, level):
    voc = make_voc(tmp_path, train=TRAIN, val=VAL)
    root = {"VOC2012": voc, "VOCdevkit": voc.parent, "base": tmp_path}[level]
    index = open_dataset("voc", root)
    assert index.root == voc
    assert index.classes == VOC_CLASSES and index.num_classes == 21
    assert index.classes[0] == "background" and index.classes[-1] == "tvmonitor"
    assert [s.id for s in index.train] == TRAIN  # list-file order: index-based split files rely on it
    assert index.train[0].image == voc / "JPEGImages" / "2007_000032.jpg"
    assert index.train[0].mask == voc / "SegmentationClassAug" / "2007_000032.png"
    assert [s.id for s in index.val] == VAL
    assert index.val[0].mask == voc / "SegmentationClass" / "2007_000033.png"


def test_voc_val_palette_masks_read_as_indices(tmp_path, make_voc):
    index = open_dataset("voc", make_voc(tmp_path, train=TRAIN, val=VAL))
    mask = read_mask(index.val[0].mask, index.num_classes)
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 255}  # indices, not the palette's RGB values
    assert 255 in mask


def test_voc_falls_back_to_train_aug_txt(tmp_path, make_voc):
    voc = make_voc(tmp_path, train=TRAIN, val=VAL, train_list="train_aug.txt")
    assert [s.id for s in open_dataset("voc", voc).train] == TRAIN


def test_voc_without_sbd_uses_train_txt_and_segmentation_class(tmp_path, make_voc):
    voc = make_voc(tmp_path, train=TRAIN, val=VAL, train_list="train.txt", aug_masks=False)
    index = open_dataset("voc", voc)
    assert [s.id for s in index.train] == TRAIN
    assert index.train[1].mask == voc / "SegmentationClass" / "2008_000002.png"


def test_voc_missing_train_mask_is_named(tmp_path, make_voc):
    voc = make_voc(tmp_path, train=TRAIN, val=VAL)
    (voc / "SegmentationClassAug" / "2008_000002.png").unlink()
    message = r"trainaug\.txt lists id '2008_000002' but .*SegmentationClassAug/2008_000002\.png does not exist"
    with pytest.raises(DataError, match=message):
        open_dataset("voc", voc)


def test_voc_root_without_jpegimages_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"is not a PASCAL VOC 2012 folder: found no JPEGImages/"):
        open_dataset("voc", tmp_path)


# ---------------------------------------------------------------------------------------------- Cityscapes

CITY_TRAIN = ["zurich/zurich_000001_000019", "aachen/aachen_000000_000019", "aachen/aachen_000001_000019"]
CITY_VAL = ["lindau/lindau_000000_000019"]


def test_cityscapes_ids_paths_and_classes(tmp_path, make_cityscapes):
    root = make_cityscapes(tmp_path, train=CITY_TRAIN, val=CITY_VAL)
    index = open_dataset("cityscapes", root)
    assert [s.id for s in index.train] == sorted(CITY_TRAIN)
    assert [s.id for s in index.val] == CITY_VAL
    first = index.train[0]
    assert first.image == root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert first.mask == root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    assert index.classes == CITYSCAPES_CLASSES and index.num_classes == 19
    assert index.classes[0] == "road" and index.classes[-1] == "bicycle"


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path, make_cityscapes):
    # methods.md: 7->0 ... 33->18, everything else -> 255
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    label_ids = np.arange(40, dtype=np.uint8).reshape(4, 10)  # every id 0..33 plus a few beyond
    root = make_cityscapes(tmp_path, train=CITY_TRAIN[:1], val=CITY_VAL, mask=lambda _: label_ids)
    index = open_dataset("cityscapes", root)
    mask = read_mask(index.train[0].mask, index.num_classes, index.label_map)
    want = np.array([expected.get(v, 255) for v in range(40)], dtype=np.uint8).reshape(4, 10)
    np.testing.assert_array_equal(mask, want)
    assert index.label_map.dtype == np.uint8 and index.label_map.shape == (256,)
    assert (index.label_map[34:] == 255).all()


def test_cityscapes_image_without_mask_is_named(tmp_path, make_cityscapes):
    root = make_cityscapes(tmp_path, train=CITY_TRAIN, val=CITY_VAL)
    (root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"lindau_000000_000019_leftImg8bit\.png has no mask .*_gtFine_labelIds\.png"):
        open_dataset("cityscapes", root)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_generates_then_opens_as_folder(tmp_path, make_folder, monkeypatch):
    import selftune.data.synthetic as synthetic

    calls = []

    def fake_ensure(root, *, seed=0):
        calls.append((root, seed))
        return make_folder(tmp_path / "generated", train=["a", "b"], val=["c"])

    monkeypatch.setattr(synthetic, "ensure_synthetic", fake_ensure)
    index = open_dataset("synthetic", tmp_path / "cache", seed=3)
    assert calls == [(tmp_path / "cache", 3)]
    assert index.name == "synthetic" and index.num_classes == 3
    assert [s.id for s in index.train] == ["a", "b"]


# ---------------------------------------------------------------------------------------------- registry


@pytest.fixture
def any_layout(tmp_path, make_folder, make_voc, make_cityscapes, monkeypatch):
    """A tiny dataset for every registered layout: a new layout fails here until it has one."""
    import selftune.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "ensure_synthetic",
                        lambda root, seed=0: make_folder(tmp_path / "syn", train=["a"], val=["b"]))
    return {
        "folder": lambda: make_folder(tmp_path / "f", train=["a"], val=["b"]),
        "voc": lambda: make_voc(tmp_path / "v", train=TRAIN, val=VAL),
        "cityscapes": lambda: make_cityscapes(tmp_path / "c", train=CITY_TRAIN, val=CITY_VAL),
        "synthetic": lambda: tmp_path / "syn-cache",
    }


@pytest.mark.parametrize("kind", available_layouts())
def test_every_layout_opens_and_its_masks_are_valid(kind, any_layout):
    assert kind in any_layout, f"layout {kind!r} has no test dataset in any_layout"
    index = open_dataset(kind, any_layout[kind]())
    assert index.train and index.val
    for sample in index.train + index.val:
        assert Path(sample.image).is_file()
        mask = read_mask(sample.mask, index.num_classes, index.label_map)
        assert mask.dtype == np.uint8 and mask.ndim == 2
