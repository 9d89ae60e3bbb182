"""The torch Dataset every stage trains and evaluates on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset, get_worker_info

from selftune.data.index import IGNORE_INDEX, Sample
from selftune.data.io import read_cached, read_image, read_mask
from selftune.data.transforms import seeded
from selftune.errors import ConfigError, DataError

GROUND_TRUTH = "ground_truth"
NO_MASKS = "none"

# ImageNet statistics: every backbone selftune builds is ImageNet-pretrained.
_FINISH = A.Compose([A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), ToTensorV2()])


class SegmentationDataset(Dataset):
    """Images with their masks, transformed jointly.

    ``masks`` says where masks come from: ``"ground_truth"`` (``sample.mask``, through
    ``label_map``), ``"none"`` (no file is read; the mask is all 255, for unlabelled images), or a
    folder of pseudo labels ``<folder>/<id>.png`` (already class ids, no ``label_map``).

    ``"ground_truth"`` refuses samples whose ``mask`` is ``None`` (unlabelled images of the
    folder format): give those ``"none"`` or a pseudo-label folder.

    An item is ``{"image": float (3, H, W) ImageNet-normalised, "mask": long (H, W) with 255 =
    ignore, "valid": bool (H, W) False on pixels added by padding, "size": long (2,) = (H, W)
    after the transform, "id": str, "index": int}``. Items of different sizes batch through
    ``make_loader(..., pad=True)``. With ``strong_transform`` (photometric, image-only ops such as
    ``selftune.data.strong.saug_augmentation``) items also carry ``"image_strong"``.

    ``cache=False`` decodes every file anew instead of through ``read_cached``: for a pass that
    reads each image once (labelling), where the cache would only hold memory that grows with the
    dataset.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        num_classes: int,
        transform: A.Compose | None,
        masks: str | Path = GROUND_TRUTH,
        label_map: np.ndarray | None = None,
        strong_transform: A.Compose | None = None,
        cache: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.num_classes = num_classes
        # An empty Compose (the evaluation transform at native size) changes nothing; skipping it
        # saves its per-item bookkeeping.
        self.transform = None if isinstance(transform, A.Compose) and not transform.transforms else transform
        self.cache = cache  # False: a one-pass read (labelling), kept out of the process's decode cache
        self.strong_transform = strong_transform  # image-only ops for a second, strongly augmented view
        self.label_map = label_map
        self.mask_folder = _mask_folder(masks)
        self.read_masks = masks != NO_MASKS
        if masks == GROUND_TRUTH:
            missing = next((s for s in self.samples if s.mask is None), None)
            if missing is not None:
                raise DataError(_no_mask(missing))
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = self._decoded(sample.image, lambda: read_image(sample.image))  # (H, W, 3) uint8
        mask = self._mask(sample, image.shape[:2])  # (H, W) uint8
        valid = np.ones(image.shape[:2], dtype=np.uint8)  # padding turns these into 255
        if self.transform is not None:
            self._reseed_in_worker()
            out = self.transform(image=image, mask=mask, masks=[valid])
            image, mask, valid = out["image"], out["mask"], out["masks"][0]
        strong = self._strong_view(image, mask)
        out = _FINISH(image=image, mask=mask)
        return {
            **strong,
            "image": out["image"],
            "mask": out["mask"].long(),
            "valid": torch.from_numpy(np.ascontiguousarray(valid) == 1),
            "size": torch.tensor(out["image"].shape[-2:], dtype=torch.long),
            "id": sample.id,
            "index": index,
        }

    def _decoded(self, path: str | Path, read: Callable[[], np.ndarray]) -> np.ndarray:
        return read_cached(path, read) if self.cache else read()

    def _strong_view(self, image: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
        """``image_strong``: the same (weakly transformed) image after ``strong_transform``, so a
        teacher can label the weak view while the student learns from the strong one."""
        if self.strong_transform is None:
            return {}
        strong = self.strong_transform(image=image, mask=mask)
        return {"image_strong": _FINISH(image=strong["image"], mask=mask)["image"]}

    def _mask(self, sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        if not self.read_masks:
            return np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        if self.mask_folder is None:
            if sample.mask is None:  # also checked in __init__; this guards samples edited since
                raise DataError(_no_mask(sample))
            path, label_map = sample.mask, self.label_map
        else:
            path, label_map = self.mask_folder / f"{sample.id}.png", None
        mask = self._decoded(path, lambda: read_mask(path, self.num_classes, label_map))
        if mask.shape != shape:
            raise DataError(
                f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but image {sample.image} is {shape[0]}x{shape[1]}"
            )
        return mask

    def seed_augmentations(self, seed: int) -> None:
        """Seed the weak and strong augmentation streams (distinct streams, both from ``seed``)."""
        for offset, transform in enumerate((self.transform, self.strong_transform)):
            if transform is not None and hasattr(transform, "set_random_state"):
                seeded(transform, seed + offset)

    def _reseed_in_worker(self) -> None:
        # Forked DataLoader workers inherit identical albumentations random states; give each
        # worker its own stream from torch's per-worker seed (itself drawn from the loader's seed).
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self.seed_augmentations(info.seed)
            self._worker_seed = info.seed


def _no_mask(sample: Sample) -> str:
    return (
        f"sample {sample.id!r} ({sample.image}) has no ground-truth mask; use masks='none' "
        "(or a pseudo-label folder) for unlabelled images"
    )


def _mask_folder(masks: str | Path) -> Path | None:
    if isinstance(masks, str) and masks in (GROUND_TRUTH, NO_MASKS):
        return None
    folder = Path(masks)
    if not folder.is_dir():
        raise ConfigError(
            f"masks={str(masks)!r} is neither {GROUND_TRUTH!r}, {NO_MASKS!r} nor an existing folder of pseudo labels"
        )
    return folder
