"""Dataset layouts on disk and the registry that opens them by name.

A layout reader turns a root folder into a ``DatasetIndex``: it lists samples and checks that
every listed file exists, but reads no pixels (masks are validated when they are read).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selftune.data._ids import read_id_file
from selftune.data.index import IGNORE_INDEX, DatasetIndex, Sample
from selftune.errors import ConfigError, DataError

LayoutReader = Callable[..., DatasetIndex]
_LAYOUTS: dict[str, LayoutReader] = {}


def register_layout(kind: str) -> Callable[[LayoutReader], LayoutReader]:
    """Register ``reader(root, **options) -> DatasetIndex`` under ``kind``; its keyword-only
    parameters are the options the layout accepts."""

    def decorate(reader: LayoutReader) -> LayoutReader:
        if kind in _LAYOUTS:
            raise ValueError(f"dataset layout {kind!r} is already registered")
        _LAYOUTS[kind] = reader
        return reader

    return decorate


def available_layouts() -> list[str]:
    return sorted(_LAYOUTS)


def open_dataset(kind: str, root: str | Path | None, **options: Any) -> DatasetIndex:
    """Open the dataset at ``root`` laid out as ``kind`` (folder, voc, cityscapes, synthetic).

    ``root`` may be ``None`` only for ``synthetic`` (its default cache folder).
    """
    reader = _LAYOUTS.get(kind)
    if reader is None:
        raise ConfigError(f"unknown dataset {kind!r}; available datasets are: {', '.join(available_layouts())}")
    accepted = [
        name for name, p in inspect.signature(reader).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"dataset {kind!r} has no option {unknown[0]!r}; its options are: {valid}")
    if root is None and kind != "synthetic":
        raise ConfigError(f"dataset {kind!r} needs a root folder (data.root); only 'synthetic' has a default")
    return reader(None if root is None else Path(root).expanduser(), **options)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a folder")


def _check_nonempty(ids: list[str], list_file: Path) -> None:
    if not ids:
        raise DataError(f"split file {list_file} lists no ids")


# ----------------------------------------------------------------------------------------------
# folder: the format users bring their own data in


_FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@register_layout("folder")
def open_folder(root: Path, *, num_classes: int | None = None) -> DatasetIndex:
    """``ROOT/images/<id>.png|jpg|jpeg``, ``ROOT/masks/<id>.png`` (class indices, 255 = ignore),
    ``ROOT/splits/{train,val}.txt`` (one id per line), optional ``ROOT/classes.txt``.

    A train id may have no mask (an unlabelled image): its ``Sample.mask`` is ``None``, and
    ``split_labelled(..., candidates=...)`` keeps it out of the labelled set. Every val id needs one.
    """
    _require_dir(root, "dataset root")
    classes = _folder_classes(root, num_classes)
    splits = {}
    for split in ("train", "val"):
        list_file = root / "splits" / f"{split}.txt"
        ids = read_id_file(list_file, depth=0)
        _check_nonempty(ids, list_file)
        splits[split] = [_folder_sample(root, i, list_file, need_mask=split == "val") for i in ids]
    return DatasetIndex("folder", root, classes, splits["train"], splits["val"])


def _folder_classes(root: Path, num_classes: int | None) -> list[str]:
    valid_count = isinstance(num_classes, int) and not isinstance(num_classes, bool) and 1 <= num_classes < IGNORE_INDEX
    if num_classes is not None and not valid_count:
        raise ConfigError(f"option num_classes must be an integer in 1..{IGNORE_INDEX - 1}, got {num_classes!r}")
    path = root / "classes.txt"
    if not path.exists():
        if num_classes is None:
            raise ConfigError(f"dataset {root} has no classes.txt; give its number of classes as option num_classes")
        return [f"class_{i}" for i in range(num_classes)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names:
        raise DataError(f"{path} must list one class name per line with no blank lines (line number = class index)")
    if len(names) >= IGNORE_INDEX:
        raise DataError(f"{path} lists {len(names)} classes; at most {IGNORE_INDEX - 1} fit beside ignore value 255")
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(f"option num_classes={num_classes} disagrees with the {len(names)} classes in {path}")
    return names


def _folder_sample(root: Path, sample_id: str, list_file: Path, *, need_mask: bool) -> Sample:
    candidates = [root / "images" / f"{sample_id}{suffix}" for suffix in _FOLDER_IMAGE_SUFFIXES]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        raise DataError(f"{list_file} lists id {sample_id!r} but there is no image {candidates[0]} (or .jpg/.jpeg)")
    mask = root / "masks" / f"{sample_id}.png"
    if mask.is_file():
        return Sample(sample_id, image, mask)
    if mask.exists():  # a folder where the mask belongs is a mistake, not an unlabelled image
        raise DataError(f"{list_file} lists id {sample_id!r} but its mask {mask} is not a file")
    if need_mask:
        raise DataError(f"{list_file} lists id {sample_id!r} but its mask {mask} does not exist")
    return Sample(sample_id, image, None)  # an unlabelled training image


# ----------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD ("trainaug")

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@register_layout("voc")
def open_voc(root: Path) -> DatasetIndex:
    """The ``VOC2012`` folder (or ``VOCdevkit``, or a folder holding ``VOCdevkit/VOC2012``).

    Train: ``ImageSets/Segmentation/trainaug.txt`` | ``train_aug.txt`` | ``train.txt`` with masks from
    ``SegmentationClassAug`` (else ``SegmentationClass``, where ST++/UniMatch keep the SBD masks).
    Val: ``val.txt`` with masks from ``SegmentationClass``. Train keeps the list file's order, which
    index-based split files (CutMix-Seg ``.pkl``) refer to.
    """
    voc = _find_voc_root(root)
    lists = voc / "ImageSets" / "Segmentation"
    aug_lists = [lists / name for name in ("trainaug.txt", "train_aug.txt")]
    train_list = next((path for path in aug_lists if path.is_file()), lists / "train.txt")
    aug = voc / "SegmentationClassAug"
    train_masks = aug if aug.is_dir() else voc / "SegmentationClass"
    train = _voc_samples(voc, train_list, train_masks)
    val = _voc_samples(voc, lists / "val.txt", voc / "SegmentationClass")
    return DatasetIndex("voc", voc, list(VOC_CLASSES), train, val)


def _find_voc_root(root: Path) -> Path:
    _require_dir(root, "dataset root")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(
        f"{root} is not a PASCAL VOC 2012 folder: found no JPEGImages/ in it, VOC2012/ or VOCdevkit/VOC2012/"
    )


def _voc_samples(voc: Path, list_file: Path, mask_dir: Path) -> list[Sample]:
    ids = read_id_file(list_file)
    _check_nonempty(ids, list_file)
    samples = [Sample(i, voc / "JPEGImages" / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
    _check_files(samples, list_file)
    return samples


def _check_files(samples: list[Sample], list_file: Path) -> None:
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is not None and not path.is_file():
                raise DataError(f"{list_file} lists id {sample.id!r} but {path} does not exist")


# ----------------------------------------------------------------------------------------------
# Cityscapes (fine annotations)

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
# labelId -> trainId for the 19 evaluated classes; every other labelId is void.
_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def cityscapes_label_map() -> np.ndarray:
    """256-entry uint8 lookup table from Cityscapes labelIds to trainIds (255 = ignore)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


@register_layout("cityscapes")
def open_cityscapes(root: Path) -> DatasetIndex:
    """``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with masks
    ``gtFine/{split}/<city>/<...>_gtFine_labelIds.png``; id ``<city>/<city>_<seq>_<frame>``, sorted."""
    _require_dir(root, "dataset root")
    train, val = (_cityscapes_samples(root, split) for split in ("train", "val"))
    return DatasetIndex("cityscapes", root, list(CITYSCAPES_CLASSES), train, val, cityscapes_label_map())


def _cityscapes_samples(root: Path, split: str) -> list[Sample]:
    image_dir = root / "leftImg8bit" / split
    _require_dir(image_dir, "Cityscapes image folder")
    samples = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        name = image.name[: -len("_leftImg8bit.png")]
        mask = root / "gtFine" / split / image.parent.name / f"{name}_gtFine_labelIds.png"
        if not mask.is_file():
            raise DataError(f"Cityscapes image {image} has no mask {mask}")
        samples.append(Sample(f"{image.parent.name}/{name}", image, mask))
    if not samples:
        raise DataError(f"Cityscapes image folder {image_dir} holds no <city>/*_leftImg8bit.png files")
    return samples


# ----------------------------------------------------------------------------------------------
# synthetic: a small generated dataset in the folder format, for tests and CPU runs


@register_layout("synthetic")
def open_synthetic(root: Path | None, *, seed: int = 0) -> DatasetIndex:
    """Generate (once, cached under ``root``) and open the synthetic dataset."""
    from selftune.data.synthetic import ensure_synthetic  # lazy: only this layout needs the generator

    index = open_folder(Path(ensure_synthetic(root, seed=seed)))
    index.name = "synthetic"
    return index
