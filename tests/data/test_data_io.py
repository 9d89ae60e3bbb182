from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selftune.data import cityscapes_label_map, read_image, read_mask
from selftune.data.io import DECODE_CACHE_ENV, read_cached
from selftune.errors import ConfigError, DataError


def test_read_image_gives_rgb_uint8(tmp_path, png):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    image = read_image(png(tmp_path / "x.png", rgb))
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    np.testing.assert_array_equal(image, rgb)


def test_read_image_converts_grey_to_three_channels(tmp_path, png):
    grey = np.full((3, 4), 77, dtype=np.uint8)
    image = read_image(png(tmp_path / "g.png", grey))
    assert image.shape == (3, 4, 3)
    assert (image == 77).all()


def test_read_mask_returns_palette_indices_not_colours(tmp_path, png):
    indices = np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8)
    path = png(tmp_path / "m.png", indices, palette=[0, 0, 0, 128, 0, 0, 0, 128, 0] + [9, 9, 9] * 253)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_mask(path, num_classes=5), indices)


def test_read_mask_applies_label_map_before_checking(tmp_path, png):
    label_ids = np.array([[7, 8, 26], [0, 33, 255]], dtype=np.uint8)  # raw Cityscapes ids, 33 > 18 classes
    mask = read_mask(png(tmp_path / "c.png", label_ids), num_classes=19, label_map=cityscapes_label_map())
    np.testing.assert_array_equal(mask, [[0, 1, 13], [255, 18, 255]])


def test_read_mask_rejects_values_outside_the_classes(tmp_path, png):
    path = png(tmp_path / "bad.png", np.array([[0, 1, 7], [9, 255, 2]], dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask .*bad\.png holds values 7, 9; valid values are 0\.\.2 or 255") as err:
        read_mask(path, num_classes=3)
    assert "\n" not in str(err.value)


def test_read_mask_rejects_colour_masks(tmp_path, png):
    path = png(tmp_path / "rgb.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"rgb\.png has PIL mode 'RGB'; masks must be single-channel"):
        read_mask(path, num_classes=3)


@pytest.mark.parametrize("reader", [read_image, lambda p: read_mask(p, num_classes=3)])
def test_corrupt_files_raise_a_one_line_error_naming_the_file(tmp_path, png, reader):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"cannot read (image|mask) .*garbage\.png") as err:
        reader(garbage)
    assert "\n" not in str(err.value)

    # a PNG cut short fails while decoding, not while opening: still a DataError
    full = png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 3, (64, 64), dtype=np.uint8)).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cannot read (image|mask) .*truncated\.png"):
        reader(truncated)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"image .*nowhere\.jpg does not exist"):
        read_image(tmp_path / "nowhere.jpg")


def _counting(path):
    calls = []

    def read():
        calls.append(path)
        return read_image(path)

    return read, calls


def test_read_cached_decodes_a_file_once_and_hands_out_copies(tmp_path, png):
    path = png(tmp_path / "once.png", np.full((4, 4, 3), 10, dtype=np.uint8))
    read, calls = _counting(path)
    first = read_cached(path, read)
    first[:] = 0  # callers may edit their copy in place
    second = read_cached(path, read)
    assert len(calls) == 1
    assert (second == 10).all()


def test_read_cached_reads_a_rewritten_file_again(tmp_path, png):
    path = png(tmp_path / "changed.png", np.full((4, 4, 3), 10, dtype=np.uint8))
    read, calls = _counting(path)
    read_cached(path, read)
    png(path, np.full((5, 4, 3), 20, dtype=np.uint8))  # new size, so a new key even within one mtime tick
    assert (read_cached(path, read) == 20).all()
    assert len(calls) == 2


def test_read_cached_with_a_zero_budget_decodes_every_time(tmp_path, png, monkeypatch):
    monkeypatch.setenv(DECODE_CACHE_ENV, "0")
    path = png(tmp_path / "uncached.png", np.full((4, 4, 3), 10, dtype=np.uint8))
    read, calls = _counting(path)
    read_cached(path, read)
    read_cached(path, read)
    assert len(calls) == 2


def test_read_cached_rejects_a_malformed_budget(tmp_path, png, monkeypatch):
    monkeypatch.setenv(DECODE_CACHE_ENV, "lots")
    path = png(tmp_path / "x.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"SELFTUNE_DECODE_CACHE_MB='lots' is not valid; give a size in MiB >= 0"):
        read_cached(path, lambda: read_image(path))


def test_read_cached_leaves_a_missing_file_to_the_readers_error(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(DataError, match=r"image .*gone\.png does not exist"):
        read_cached(path, lambda: read_image(path))
