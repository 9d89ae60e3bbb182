"""Pictures logged as MLflow artifacts: pseudo labels next to ground truth.

An overlay reads on its own: each panel has a title (image | ground truth | pseudo label), and a
legend under the panels names the colour of every class the masks show, and white for pixels that
are not kept (a pseudo label below its threshold; the ground truth's void pixels are white too).
Drawn with PIL's ``ImageDraw`` and its built-in scalable font: no plotting library needed."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (255, 255, 255)
IGNORE_NAME = "not kept"  # what white means in the legend
MASK_TITLES = ("ground truth", "pseudo label")  # the last mask panels' titles unless told otherwise
BACKGROUND = (214, 214, 214)  # grey, so that white (not kept) pixels stand out from the margins
INK = (20, 20, 20)
FONT_PX = (8, 16)  # smallest and largest text size: the largest whose titles fit their panels
GAP = 3  # px: between panels, around text and swatches


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), so class colours match what people know."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for index in range(num_classes):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def colourise(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ignored pixels white."""
    colours = palette(num_classes)
    out = colours[np.clip(mask, 0, num_classes - 1)]
    out[mask == ignore_index] = IGNORE_COLOUR
    return out


def save_overlay(
    path: Path, image: np.ndarray, panels: Sequence[np.ndarray], num_classes: int, *, scale: int = 1,
    titles: Sequence[str] | None = None, class_names: Sequence[str] | None = None, ignore_index: int = 255,
) -> Path:
    """One PNG: the RGB image, then each mask panel (e.g. ground truth, pseudo label) side by side,
    each under its title, with the legend of the classes shown (``class_names``, default
    ``class <k>``) and white = not kept below.

    ``titles`` names the mask panels (default: the last of "ground truth", "pseudo label"; the
    image panel is always "image"). Panel pixels are the masks' colours, enlarged ``scale`` times.
    """
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} mask panels")
    strips = [image] + [colourise(mask, num_classes, ignore_index) for mask in panels]
    strips = [strip.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else strip for strip in strips]
    names = ["image", *(titles if titles is not None else _default_titles(len(panels)))]
    entries = legend_entries(panels, num_classes, class_names, ignore_index)
    _labelled_picture(strips, names, entries).save(path)
    return path


def _default_titles(count: int) -> list[str]:
    extra = [f"mask {k + 1}" for k in range(max(0, count - len(MASK_TITLES)))]
    return extra + list(MASK_TITLES[len(MASK_TITLES) - min(count, len(MASK_TITLES)):])


def legend_entries(
    panels: Sequence[np.ndarray], num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255,
) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, name) for each class some mask shows, in class order, then white = not kept.
    Only the classes shown: VOC's 21 or Cityscapes' 19 names would not fit under small panels."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    present = np.zeros(num_classes, dtype=bool)
    for mask in panels:
        values = np.unique(mask)
        present[values[(values >= 0) & (values < num_classes)]] = True
    colours = palette(num_classes)
    entries = [(tuple(int(c) for c in colours[k]), class_names[k] if class_names is not None else f"class {k}")
               for k in np.flatnonzero(present)]
    return entries + [(IGNORE_COLOUR, IGNORE_NAME)]


def _fitting_font(titles: list[str], panel_width: int):
    """The largest font (within ``FONT_PX``) in which every title fits its panel."""
    smallest, largest = FONT_PX
    for size in range(largest, smallest, -1):
        font = ImageFont.load_default(size=size)
        if max(font.getlength(title) for title in titles) <= panel_width - 2 * GAP:
            return font
    return ImageFont.load_default(size=smallest)


def _labelled_picture(strips: list[np.ndarray], titles: list[str], entries) -> Image.Image:
    font = _fitting_font(titles, min(strip.shape[1] for strip in strips))
    gap = GAP
    line = _text_height(font) + 2 * gap  # one row of titles or legend
    panel_height = max(strip.shape[0] for strip in strips)
    width = sum(strip.shape[1] for strip in strips) + gap * (len(strips) - 1)
    rows = _legend_rows(entries, font, width, line, gap)
    picture = Image.new("RGB", (width, line + panel_height + line * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    left = 0
    for strip, title in zip(strips, titles):
        picture.paste(Image.fromarray(strip), (left, line))
        text_width = draw.textlength(title, font=font)
        draw.text((left + (strip.shape[1] - text_width) / 2, gap), title, fill=INK, font=font)
        left += strip.shape[1] + gap
    for row_index, row in enumerate(rows):
        top = line + panel_height + row_index * line
        for x, colour, name in row:
            _draw_entry(draw, x, top, colour, name, font, line, gap)
    return picture


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom


def _entry_width(name: str, font, line: int, gap: int) -> float:
    swatch = line - 2 * gap
    return swatch + gap + font.getlength(name) + 3 * gap


def _legend_rows(entries, font, width: int, line: int, gap: int) -> list[list[tuple[float, tuple, str]]]:
    """Legend entries laid out left to right, wrapped onto as many rows as ``width`` needs."""
    rows: list[list[tuple[float, tuple, str]]] = [[]]
    x = float(gap)
    for colour, name in entries:
        step = _entry_width(name, font, line, gap)
        if rows[-1] and x + step > width:
            rows.append([])
            x = float(gap)
        rows[-1].append((x, colour, name))
        x += step
    return rows


def _draw_entry(draw: ImageDraw.ImageDraw, x: float, top: int, colour, name: str, font, line: int, gap: int) -> None:
    """A colour swatch (outlined, so that white shows on any background) and the class name."""
    swatch = line - 2 * gap
    draw.rectangle([x, top + gap, x + swatch, top + gap + swatch], fill=colour, outline=INK)
    draw.text((x + swatch + gap, top + gap), name, fill=INK, font=font)
