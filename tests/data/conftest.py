"""Tiny datasets on disk in the real layouts (folder, VOC, Cityscapes), built with numpy + PIL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# VOC's colour map for the first classes: palette index k is drawn in a colour unrelated to k.
VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0, 0, 0] * 250 + [224, 224, 192]


def write_png(path: Path, array: np.ndarray, *, palette: list[int] | None = None) -> Path:
    """Write ``array`` as a PNG (uint8 (H, W) grey or palette, or (H, W, 3) RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette is not None:
        image = image.convert("L") if image.mode != "L" else image
        image = image.copy()
        image.putpalette(palette)  # turns the 'L' image into mode 'P' with the same indices
    image.save(path)
    return path


def write_jpg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=95)
    return path


def random_image(rng: np.random.Generator, size: tuple[int, int] = (12, 16)) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def random_mask(rng: np.random.Generator, num_classes: int, size: tuple[int, int] = (12, 16)) -> np.ndarray:
    mask = rng.integers(0, num_classes, size, dtype=np.uint8)
    mask[0, 0] = 255  # every mask carries an ignore pixel
    return mask


def build_folder(root: Path, *, train: list[str], val: list[str], classes: list[str] | None = ("a", "b", "c"),
                 jpg: tuple[str, ...] = (), num_classes: int = 3, unmasked: tuple[str, ...] = (),
                 sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """``root/{images,masks,splits}`` in the folder format; ids in ``jpg`` get a .jpg image, ids in
    ``unmasked`` no mask file, ids in ``sizes`` that (H, W) instead of 12x16."""
    rng = np.random.default_rng(0)
    for sample_id in dict.fromkeys(train + val):
        size = (sizes or {}).get(sample_id, (12, 16))
        if sample_id in jpg:
            write_jpg(root / "images" / f"{sample_id}.jpg", random_image(rng, size))
        else:
            write_png(root / "images" / f"{sample_id}.png", random_image(rng, size))
        mask = random_mask(rng, num_classes, size)  # drawn either way: other ids' pixels stay the same
        if sample_id not in unmasked:
            write_png(root / "masks" / f"{sample_id}.png", mask)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n\n")
    (root / "splits" / "val.txt").write_text("\n".join(val) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def build_voc(base: Path, *, train: list[str], val: list[str], train_list: str = "trainaug.txt",
              aug_masks: bool = True) -> Path:
    """``base/VOCdevkit/VOC2012`` with JPEG images, palette val masks and (optionally) SBD aug masks.

    The train list uses DeepLab's ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines.
    Returns the VOC2012 folder.
    """
    voc = base / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    train_mask_dir = "SegmentationClassAug" if aug_masks else "SegmentationClass"
    for sample_id in train:
        write_jpg(voc / "JPEGImages" / f"{sample_id}.jpg", random_image(rng))
        write_png(voc / train_mask_dir / f"{sample_id}.png", random_mask(rng, 21))
    for sample_id in val:
        write_jpg(voc / "JPEGImages" / f"{sample_id}.jpg", random_image(rng))
        write_png(voc / "SegmentationClass" / f"{sample_id}.png", random_mask(rng, 5), palette=VOC_PALETTE)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / train_list).write_text("".join(f"/JPEGImages/{i}.jpg /{train_mask_dir}/{i}.png\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return voc


def build_cityscapes(root: Path, *, train: list[str], val: list[str],
                     mask: Callable[[str], np.ndarray] | None = None) -> Path:
    """``root/leftImg8bit/{split}/<city>/<id>_leftImg8bit.png`` + ``gtFine/..._gtFine_labelIds.png``;
    ids are ``<city>/<city>_<seq>_<frame>``."""
    rng = np.random.default_rng(2)
    for split, ids in (("train", train), ("val", val)):
        for sample_id in ids:
            city, name = sample_id.split("/")
            write_png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", random_image(rng, (8, 16)))
            label_ids = mask(sample_id) if mask else rng.choice([0, 7, 8, 26], (8, 16)).astype(np.uint8)
            write_png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label_ids)
            # the sibling files a real download has, which must not be mistaken for samples
            write_png(root / "gtFine" / split / city / f"{name}_gtFine_color.png", random_image(rng, (8, 16)))
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    return build_folder(tmp_path / "shapes", train=["t0", "t1", "t2", "t3"], val=["v0", "v1"], jpg=("t3",))


# The builders as fixtures, so test modules need not import this conftest.
@pytest.fixture
def png() -> Callable[..., Path]:
    return write_png


@pytest.fixture
def make_folder() -> Callable[..., Path]:
    return build_folder


@pytest.fixture
def make_voc() -> Callable[..., Path]:
    return build_voc


@pytest.fixture
def make_cityscapes() -> Callable[..., Path]:
    return build_cityscapes
