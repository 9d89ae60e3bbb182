"""A split file cannot make selftune read or write outside the dataset root: an id that climbs out
with ``..`` or is an absolute path is refused with one line naming the split file and the line."""

from __future__ import annotations

import pytest

from selftune.data import open_dataset, split_labelled
from selftune.errors import DataError

OUTSIDE = "../../outside/evil"


def _plant_outside_image(tmp_path, png):
    """An image the hostile id points at, so only the id check can stop it (not a missing file)."""
    import numpy as np

    png(tmp_path / "outside" / "evil.png", np.zeros((12, 16, 3), np.uint8))


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("entry", [OUTSIDE, "{outside}/evil", "t1/../../../outside/evil"])
def test_folder_split_entry_leaving_the_root_is_refused_with_file_and_line(tmp_path, make_folder, png, split, entry):
    root = make_folder(tmp_path / "ds" / "d", train=["t0", "t1"], val=["v0"])
    _plant_outside_image(tmp_path / "ds", png)
    (root / "images" / "t1").mkdir()  # so "t1/.." exists as a folder on disk
    entry = entry.format(outside=tmp_path / "ds" / "outside")  # the absolute spelling
    list_file = root / "splits" / f"{split}.txt"
    lines = list_file.read_text().splitlines()
    list_file.write_text("\n".join([lines[0], entry, *lines[1:]]) + "\n")
    with pytest.raises(DataError) as error:
        open_dataset("folder", root)
    message = str(error.value)
    assert message.startswith(f"split file {list_file} line 2: ")
    assert entry in message and "\n" not in message


def test_labelled_split_file_leaving_the_root_is_refused(tmp_path):
    ids = ["a", "b", "c"]
    split = tmp_path / "labelled.txt"
    split.write_text("a\n# comment\n../../b\n")  # normalised to 'b' it would silently be accepted
    with pytest.raises(DataError, match=rf"^split file {split} line 3: '\.\./\.\./b' climbs out"):
        split_labelled(ids, split, seed=0)


def test_voc_list_entry_leaving_the_root_is_refused(tmp_path, make_voc):
    voc = make_voc(tmp_path, train=["x1", "x2"], val=["y1"])
    train_list = voc / "ImageSets" / "Segmentation" / "trainaug.txt"
    train_list.write_text(train_list.read_text() + "/JPEGImages/../../../x1.jpg /SegmentationClassAug/x1.png\n")
    with pytest.raises(DataError, match=rf"^split file {train_list} line 3: .* climbs out"):
        open_dataset("voc", voc)


def test_published_leading_slash_paths_still_work(tmp_path, make_voc):
    voc = make_voc(tmp_path, train=["x1", "x2"], val=["y1"])  # DeepLab's "/JPEGImages/x1.jpg ..." lines
    assert [s.id for s in open_dataset("voc", voc).train] == ["x1", "x2"]
