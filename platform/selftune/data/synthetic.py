"""The built-in synthetic dataset: textured objects on cluttered backgrounds.

Each object class is a *texture family* (stripes, checker, dots, ...); an instance draws its own two
colours, period, orientation, edge sharpness, shading and blob-like outline, so neither colour nor
shape tells the classes apart, only the texture does. Objects overlap (later ones occlude earlier
ones) and vary in size; the background is a smooth colour field with untextured distractor shapes
and speckle, and every image gets sensor noise. A model given a dozen labelled images sees only a
few colours and scales of each class and underfits; the unlabelled images cover the rest, which is
what makes semi-supervision pay off on this dataset (``benchmarks/synthetic_calibration.py``
measures that).

Written in the folder format every selftune dataset reader understands::

    out_dir/images/<id>.png      RGB uint8
    out_dir/masks/<id>.png       uint8 class indices; 255 = ignore (a thin band at object borders)
    out_dir/splits/train.txt     one id per line
    out_dir/splits/val.txt
    out_dir/classes.txt          one class name per line, class 0 = background
    out_dir/synthetic.json       the generator's version and arguments (informational)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selftune.data.index import IGNORE_INDEX
from selftune.errors import DataError

__all__ = [
    "CLASSES",
    "FORMAT_VERSION",
    "SyntheticDesign",
    "default_cache_dir",
    "ensure_synthetic",
    "generate_synthetic",
    "is_dataset",
]

# Bump when the generator's output changes, so caches of the old design are not reused.
FORMAT_VERSION = 1
CLASSES = ("background", "stripes", "checker", "dots", "rings", "waves", "grid", "sunburst")


@dataclass(frozen=True)
class SyntheticDesign:
    """Difficulty knobs of the generator. Sizes are in pixels of a 64x64 image and scale with
    ``image_size``. The defaults are the calibrated design; see the calibration benchmark."""

    num_object_classes: int = len(CLASSES) - 1  # use the first N texture families
    objects: tuple[int, int] = (2, 5)  # objects per image, inclusive
    radius: tuple[float, float] = (7.0, 17.0)  # object radius
    period: tuple[float, float] = (3.5, 8.0)  # texture period
    contrast: tuple[float, float] = (0.25, 0.8)  # how far an object's second colour is from its first
    angle: tuple[float, float] = (0.0, 180.0)  # texture orientation, degrees
    colour_mode: str = "pair"  # "pair": two unrelated colours; "shade": the second is darker or lighter
    hue_spread: float | None = None  # degrees: class k's hue is k/K of the circle +- this; None: any hue
    saturation: tuple[float, float] = (0.3, 1.0)  # of an object's first colour when hue_spread is set
    value: tuple[float, float] = (0.35, 1.0)
    distractors: tuple[int, int] = (2, 6)  # untextured shapes on the background, inclusive
    speckle: tuple[float, float] = (0.0, 0.12)  # amplitude of fine background noise
    noise: tuple[float, float] = (0.01, 0.06)  # per-pixel sensor noise sigma
    ignore_border: bool = True  # mark anti-aliased object borders 255


def default_cache_dir() -> Path:
    """``$SELFTUNE_CACHE`` or ``~/.cache/selftune``."""
    return Path(os.environ.get("SELFTUNE_CACHE") or Path.home() / ".cache" / "selftune").expanduser()


def is_dataset(root: str | Path) -> bool:
    """Whether ``root`` holds a complete folder-format dataset (the files written last exist)."""
    root = Path(root)
    required = ("classes.txt", "splits/train.txt", "splits/val.txt", "images", "masks")
    return all((root / name).exists() for name in required)


def ensure_synthetic(root: str | Path | None = None, *, seed: int = 0) -> Path:
    """Return a folder holding the synthetic dataset for ``seed``, generating it on first use.

    ``root=None`` uses ``<cache>/synthetic-v<FORMAT_VERSION>-seed<seed>``. A ``root`` that already
    holds a dataset is used as it is. Generation writes into a temporary sibling folder and renames
    it into place, so concurrent callers (Ray workers, Tune trials) never see a half-written
    dataset; when several generate at once, the first rename wins and the others use its result.
    """
    if root is None:
        root = default_cache_dir() / f"synthetic-v{FORMAT_VERSION}-seed{seed}"
    root = Path(root).expanduser()
    if is_dataset(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} exists but is not a complete dataset (it lacks classes.txt, splits/ or images/); "
            "remove it or point data.root at another folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_synthetic(tmp, seed=seed)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder on POSIX, fails on a non-empty one
        except OSError:
            if not is_dataset(root):  # not lost to a concurrent generator: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 150,
    image_size: int = 64,
    design: SyntheticDesign | None = None,
) -> Path:
    """Write ``num_train + num_val`` images and masks to ``out_dir`` in the folder format.

    Deterministic for (``seed``, ``image_size``, ``design``); the images of a split do not depend on
    the sizes, so a smaller dataset is a prefix of a larger one.
    """
    design = design or SyntheticDesign()
    if not 1 <= design.num_object_classes <= len(CLASSES) - 1:
        raise ValueError(f"num_object_classes must be in [1, {len(CLASSES) - 1}], but got {design.num_object_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, but got {image_size}")
    out_dir = Path(out_dir)
    for sub in ("images", "masks", "splits"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for sample_id, (image, mask) in zip(ids, _render_split(seed, split_code, count, image_size, design)):
            Image.fromarray(image, mode="RGB").save(out_dir / "images" / f"{sample_id}.png", compress_level=1)
            Image.fromarray(mask, mode="L").save(out_dir / "masks" / f"{sample_id}.png", compress_level=1)
        splits[split] = ids
    # Written last: their presence marks the dataset complete (is_dataset).
    meta = {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "design": asdict(design)}
    (out_dir / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "classes.txt").write_text("\n".join(CLASSES[: design.num_object_classes + 1]) + "\n")
    for split, ids in splits.items():
        (out_dir / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return out_dir


# --------------------------------------------------------------------------------------- rendering
#
# Images are rendered in chunks of _CHUNK, vectorised over the chunk: every array below is
# (N, H, W) or (N, H, W, 3), and per-image parameters are (N, 1, 1). A chunk draws from its own
# generator seeded by (seed, split, chunk), so image i of a split is the same whatever the split's
# size (a tiny test dataset is a prefix of the full one).

_CHUNK = 32


def _render_split(seed: int, split_code: int, count: int, size: int, design: SyntheticDesign):
    """Yield ``count`` (image (H, W, 3) uint8, mask (H, W) uint8) pairs."""
    for start in range(0, count, _CHUNK):
        rng = np.random.default_rng([seed, split_code, start // _CHUNK])
        images, masks = _render_chunk(rng, _CHUNK, size, design)
        yield from zip(images[: count - start], masks[: count - start])


def _smooth_field(rng: np.random.Generator, n: int, size: int, cells: int, channels: int) -> np.ndarray:
    """Random ``(cells, cells)`` grids bilinearly upsampled: ``(n, size, size, channels)`` in [0, 1]."""
    grid = rng.random((n, channels, cells, cells), dtype=np.float32)
    pos = (np.arange(size) + 0.5) * (cells - 1) / size  # pixel centres in grid units
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    weights = np.zeros((size, cells), np.float32)  # (size, cells): bilinear weights per pixel row
    weights[np.arange(size), lo] = 1 - (pos - lo)
    weights[np.arange(size), lo + 1] = pos - lo
    return (weights @ grid @ weights.T).transpose(0, 2, 3, 1)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    """(n, 1, 1) float32 draws, broadcastable against (n, H, W) images."""
    return rng.uniform(bounds[0], bounds[1], (n, 1, 1)).astype(np.float32)


def _blobs(rng: np.random.Generator, n: int, size: int, radius: tuple[float, float]):
    """Soft coverage (n, H, W) of one random blob per image: an ellipse whose radius wobbles with
    angle, anywhere in or slightly beyond the frame. Also returns centres (cx, cy), (n, 1, 1)."""
    scale = size / 64.0
    coords = np.arange(size, dtype=np.float32) + 0.5
    r = _uniform(rng, radius, n) * scale
    cx, cy = _uniform(rng, (-0.1 * size, 1.1 * size), n), _uniform(rng, (-0.1 * size, 1.1 * size), n)
    aspect, angle = _uniform(rng, (0.6, 1.0), n), _uniform(rng, (0.0, np.pi), n)
    amps, phases = _uniform(rng, (0.0, 0.15), 3 * n).reshape(3, n, 1, 1), _uniform(rng, (0, 2 * np.pi), 3 * n)
    dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy  # (n, 1, W), (n, H, 1)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    wobble = 1 + sum(a * np.cos(k * theta + p) for a, k, p in zip(amps, (2, 3, 5), phases.reshape(3, n, 1, 1)))
    alpha = np.clip(r * wobble - np.hypot(u, v) + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge
    return alpha, cx, cy


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n,) hue (turns), saturation, value -> (n, 3) RGB float32."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * (h % 1.0)[:, None]) % 6  # (n, 3)
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _colour_pairs(rng: np.random.Generator, n: int, contrast: tuple[float, float], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours per image, ``contrast`` apart (Euclidean distance / sqrt(3)): (n, 3) each."""
    first = rng.random((n, 3), dtype=np.float32)
    if mode == "shade":
        # Towards black or white (with a little hue of its own): a mostly-luminance pattern.
        target = 0.75 * (rng.random((n, 1)) < 0.5) + 0.25 * rng.random((n, 3))
        depth = rng.uniform(contrast[0], contrast[1], (n, 1))
        return first, (first + depth * (target - first)).astype(np.float32)
    direction = rng.normal(size=(n, 3)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-8
    step = direction * rng.uniform(contrast[0], contrast[1], (n, 1)).astype(np.float32) * np.sqrt(3)
    second = first + step
    outside = ((second < 0) | (second > 1)).any(axis=1, keepdims=True)
    second = np.where(outside, first - step, second)  # try the other side, then clip
    return first, np.clip(second, 0, 1)


def _textures(kind: str, u, v, rho, theta, period, phase, warp_amp, warp_len) -> np.ndarray:
    """A signed texture field, > 0 draws an object's first colour, < 0 its second. ``(u, v)`` are
    rotated coordinates, ``(rho, theta)`` polar ones about the object's centre; ``period``,
    ``phase``, ``warp_*`` are per-image (m, 1, 1)."""
    k = 2 * np.pi / period
    if kind == "stripes":
        return np.sin(k * u + phase)
    if kind == "checker":
        return np.sin(k * u + phase) * np.sin(k * v)
    if kind == "dots":
        return np.cos(k * u + phase) + np.cos(k * v) - 0.9
    if kind == "rings":
        return np.sin(k * rho + phase)
    if kind == "waves":
        return np.sin(k * (u + warp_amp * period * np.sin(2 * np.pi * v / (warp_len * period))) + phase)
    if kind == "grid":
        return np.maximum(np.cos(k * u + phase), np.cos(k * v)) - 0.75
    if kind == "sunburst":
        spokes = np.maximum(4, np.round(2 * np.pi * 10 / (1.5 * period)))  # spacing ~ period at radius 10
        return np.sin(spokes * theta + phase)
    raise ValueError(f"unknown texture {kind!r}")


def _render_chunk(rng: np.random.Generator, n: int, size: int, design: SyntheticDesign) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, H, W, 3) uint8 and masks (n, H, W) uint8."""
    scale = size / 64.0
    coords = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = coords[None, None, :], coords[None, :, None]

    # Background: a smooth colour field of two octaves, untextured distractor shapes, speckle.
    mix = _uniform(rng, (0, 1), n)[..., None]
    field = (1 - mix) * _smooth_field(rng, n, size, 3, 3) + mix * _smooth_field(rng, n, size, 6, 3)
    image = field * _uniform(rng, (0.4, 1.0), n)[..., None] + _uniform(rng, (0.0, 0.4), n)[..., None]
    count = rng.integers(design.distractors[0], design.distractors[1] + 1, n)
    for slot in range(design.distractors[1]):
        alpha, _, _ = _blobs(rng, n, size, (design.radius[0] * 0.5, design.radius[1] * 0.8))
        alpha = (alpha * (slot < count)[:, None, None])[..., None]  # (n, H, W, 1)
        gradient = 1 + _uniform(rng, (-0.3, 0.3), n) * (xx - size / 2) / size  # (n, 1, W)
        colour = rng.random((n, 1, 1, 3), dtype=np.float32) * gradient[..., None]
        image = image * (1 - alpha) + colour * alpha
    speckle = _uniform(rng, design.speckle, n)[..., None]
    image = image + speckle * (_smooth_field(rng, n, size, max(2, size // 2), 1) - 0.5)

    # Objects, painted back to front: later ones occlude earlier ones.
    mask = np.zeros((n, size, size), np.uint8)
    border = np.zeros((n, size, size), bool)
    count = rng.integers(design.objects[0], design.objects[1] + 1, n)
    kinds = CLASSES[1 : design.num_object_classes + 1]
    for slot in range(design.objects[1]):
        active = (slot < count)[:, None, None]
        cls = rng.integers(1, design.num_object_classes + 1, n)
        alpha, cx, cy = _blobs(rng, n, size, design.radius)
        alpha = alpha * active
        angle = np.deg2rad(_uniform(rng, design.angle, n))
        dx, dy = xx - cx, yy - cy  # (n, 1, W), (n, H, 1)
        u = dx * np.cos(angle) + dy * np.sin(angle)  # (n, H, W)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        params = {
            "period": _uniform(rng, design.period, n) * scale,
            "phase": _uniform(rng, (0, 2 * np.pi), n),
            "warp_amp": _uniform(rng, (0.4, 0.8), n),
            "warp_len": _uniform(rng, (2.0, 3.5), n),
        }
        signed = np.zeros((n, size, size), np.float32)
        for index, kind in enumerate(kinds, start=1):
            sel = cls == index
            if sel.any():
                signed[sel] = _textures(kind, u[sel], v[sel], rho[sel], theta[sel], **{k: p[sel] for k, p in params.items()})
        t = 1 / (1 + np.exp(-_uniform(rng, (2.0, 8.0), n) * signed))  # (n, H, W) soft two-colour mix
        first, second = _colour_pairs(rng, n, design.contrast, design.colour_mode)
        if design.hue_spread is not None:
            # Each class has a typical hue, as real classes do (sky, grass); neighbours overlap.
            hue = (cls - 1) / design.num_object_classes + rng.uniform(-1, 1, n) * design.hue_spread / 360
            first = _hsv_to_rgb(hue, rng.uniform(*design.saturation, n), rng.uniform(*design.value, n))
            target = (rng.random((n, 1)) < 0.5).astype(np.float32)  # second colour: towards black or white
            second = first + rng.uniform(design.contrast[0], design.contrast[1], (n, 1)) * (target - first)
        colour = t[..., None] * first[:, None, None] + (1 - t[..., None]) * second[:, None, None]
        shading = 1 + _uniform(rng, (-0.35, 0.35), n) * u / (design.radius[1] * scale)
        image = image * (1 - alpha[..., None]) + colour * (shading * alpha)[..., None]
        inside = alpha >= 0.5
        mask[inside] = np.broadcast_to(cls[:, None, None], mask.shape)[inside]
        # An object's anti-aliased rim is ignored; an object painted over a rim claims it back.
        rim = (alpha > 0.15) & (alpha < 0.85)
        border = (border & ~inside) | rim

    image = image * _uniform(rng, (0.75, 1.2), n)[..., None]
    image = image + rng.normal(0, 1, image.shape).astype(np.float32) * _uniform(rng, design.noise, n)[..., None]
    if design.ignore_border:
        mask[border] = IGNORE_INDEX
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask
