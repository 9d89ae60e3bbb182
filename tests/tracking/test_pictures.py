"""Overlay pictures people can read: titled panels, a legend of class colours, white = not kept."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selftune.tracking.pictures import (
    BACKGROUND, GAP, IGNORE_COLOUR, IGNORE_NAME, colourise, legend_entries, palette, save_overlay,
)

H, W, CLASSES = 32, 40, 5
NAMES = ["background", "road", "sky", "car", "person"]


def _example():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    truth = np.zeros((H, W), dtype=np.uint8)
    truth[:, 20:] = 1
    truth[:8, :8] = 3  # class 2 ("sky") and 4 ("person") appear nowhere
    pseudo = truth.copy()
    pseudo[10:20, 10:30] = 255  # not kept
    return image, truth, pseudo


def _panels_top(picture: np.ndarray, first: np.ndarray) -> int:
    """The row where the first panel (the image) starts: the title line is above it."""
    for top in range(picture.shape[0] - first.shape[0] + 1):
        if np.array_equal(picture[top:top + first.shape[0], :first.shape[1]], first):
            return top
    raise AssertionError("the image panel is not in the picture")


@pytest.mark.parametrize("scale", [1, 2])
def test_three_titled_panels_with_the_masks_colours_and_a_legend_below(tmp_path, scale):
    image, truth, pseudo = _example()
    path = save_overlay(tmp_path / "o.png", image, [truth, pseudo], CLASSES, scale=scale, class_names=NAMES)
    picture = np.array(Image.open(path).convert("RGB"))
    h, w = H * scale, W * scale
    assert picture.shape[1] == 3 * w + 2 * GAP  # three panels side by side
    big = lambda a: a.repeat(scale, axis=0).repeat(scale, axis=1)  # noqa: E731
    top = _panels_top(picture, big(image))
    assert top > 0, "no title line above the panels"
    for index, expected in enumerate([big(image), big(colourise(truth, CLASSES)), big(colourise(pseudo, CLASSES))]):
        left = index * (w + GAP)
        assert np.array_equal(picture[top:top + h, left:left + w], expected), f"panel {index} changed"
        title = picture[:top, left:left + w]
        assert (title.sum(axis=2) < 200).any(), f"panel {index} has no title drawn above it"
    legend = picture[top + h:]
    assert legend.shape[0] > 0 and (legend.sum(axis=2) < 200).any(), "no legend text below the panels"


def test_legend_shows_the_colours_of_the_classes_present_and_white_not_kept(tmp_path):
    image, truth, pseudo = _example()
    picture = np.array(Image.open(save_overlay(tmp_path / "o.png", image, [truth, pseudo], CLASSES, class_names=NAMES)).convert("RGB"))
    legend = picture[_panels_top(picture, image) + H:]
    colours = {tuple(int(c) for c in pixel) for pixel in legend.reshape(-1, 3)}
    shown = palette(CLASSES)
    for present in (0, 1, 3):
        assert tuple(int(c) for c in shown[present]) in colours, f"class {present}'s swatch missing"
    for absent in (2, 4):
        assert tuple(int(c) for c in shown[absent]) not in colours, f"class {absent} is not in the masks"
    assert IGNORE_COLOUR in colours and BACKGROUND in colours


def test_legend_entries_name_the_classes_in_class_order_then_not_kept():
    _, truth, pseudo = _example()
    colours = palette(CLASSES)
    entries = legend_entries([truth, pseudo], CLASSES, NAMES)
    assert [name for _, name in entries] == ["background", "road", "car", IGNORE_NAME]
    assert entries[2][0] == tuple(int(c) for c in colours[3]) and entries[-1][0] == IGNORE_COLOUR
    assert [name for _, name in legend_entries([truth], CLASSES)] == ["class 0", "class 1", "class 3", IGNORE_NAME]
    with pytest.raises(ValueError, match="2 class names for 5 classes"):
        legend_entries([truth], CLASSES, ["a", "b"])


def test_long_class_names_wrap_the_legend_onto_more_rows(tmp_path):
    image, truth, pseudo = _example()
    short = save_overlay(tmp_path / "s.png", image, [truth, pseudo], CLASSES, class_names=["a", "b", "c", "d", "e"])
    long = save_overlay(tmp_path / "l.png", image, [truth, pseudo], CLASSES,
                        class_names=[f"a rather long class name {k}" for k in range(CLASSES)])
    short_size, long_size = Image.open(short).size, Image.open(long).size
    assert short_size[0] == long_size[0] and long_size[1] > short_size[1]


def test_titles_default_to_ground_truth_and_pseudo_label_and_can_be_given(tmp_path):
    image, truth, pseudo = _example()
    one = np.array(Image.open(save_overlay(tmp_path / "1.png", image, [pseudo], CLASSES)).convert("RGB"))
    assert one.shape[1] == 2 * W + GAP  # the call the pseudo-label stage makes without ground truth
    named = save_overlay(tmp_path / "n.png", image, [pseudo], CLASSES, titles=["teacher"])
    default = np.array(Image.open(tmp_path / "1.png").convert("RGB"))
    top = _panels_top(default, image)
    # The second panel's title is the one given ("teacher", not "pseudo label").
    other = np.array(Image.open(named).convert("RGB"))
    other_top = _panels_top(other, image)  # a shorter title may get a larger font
    assert np.array_equal(other[other_top:other_top + H, W + GAP:], default[top:top + H, W + GAP:])  # same mask
    assert (other[:other_top, W + GAP:].sum(axis=2) < 200).any()
    assert other[:other_top, W + GAP:].shape != default[:top, W + GAP:].shape or \
        not np.array_equal(other[:other_top, W + GAP:], default[:top, W + GAP:])
    with pytest.raises(ValueError, match="1 titles for 2 mask panels"):
        save_overlay(tmp_path / "x.png", image, [truth, pseudo], CLASSES, titles=["only one"])


def test_margins_are_grey_so_that_white_not_kept_pixels_stand_out(tmp_path):
    image, _, pseudo = _example()
    picture = np.array(Image.open(save_overlay(tmp_path / "o.png", image, [pseudo], CLASSES)).convert("RGB"))
    title = picture[:_panels_top(picture, image)]
    assert {tuple(int(c) for c in title[0, 0]), tuple(int(c) for c in title[-1, -1])} == {BACKGROUND}
    assert BACKGROUND != IGNORE_COLOUR


def test_not_kept_pixels_are_white_exactly_where_the_pseudo_label_is_255(tmp_path):
    image, truth, pseudo = _example()
    picture = np.array(Image.open(save_overlay(tmp_path / "o.png", image, [truth, pseudo], CLASSES, class_names=NAMES)).convert("RGB"))
    top, left = _panels_top(picture, image), 2 * (W + GAP)  # the third panel: the pseudo label
    white = (picture[top:top + H, left:left + W] == IGNORE_COLOUR).all(axis=2)
    assert np.array_equal(white, pseudo == 255)
