"""The built-in synthetic dataset: textured objects on cluttered backgrounds.

Five object classes plus background, 64x64 images. A class is a *texture family* (stripes,
checker, dots, rings, waves) and has a typical hue, as real classes have colour priors; an
instance draws its own hue within +-30 degrees of its class's, saturation, brightness, texture
orientation, phase and edge sharpness, a second colour towards black or white, shading and a blob
outline. Objects (3-6 per image, radius 10-20 px) overlap, later ones occluding earlier ones, and
run off the frame. The background is a smooth colour field with untextured distractor shapes of
any colour, speckle and sensor noise, so neither colour nor "something is there" alone finds the
objects.

Why this design (measured with ``benchmarks/synthetic_calibration.py``): learning colour-invariant
texture detectors from scratch is slow for a small CNN (a pure-texture variant stayed near 0.2 mIoU
after 400 steps even with 500 labelled images), so texture alone makes a CPU-minutes default
hopeless, while colour alone is solved by a dozen images. With class hues that do not overlap but
vary, 24 labelled images give a model that clearly underfits (~0.70 val mIoU against ~0.86 with
every image labelled, for the same compute) yet labels ~75% of the unlabelled pixels at ~0.9
mIoU, and self-training on them adds about 5 points.

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
from concurrent.futures import ThreadPoolExecutor
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
FORMAT_VERSION = 2
CLASSES = ("background", "stripes", "checker", "dots", "rings", "waves", "grid", "sunburst")


@dataclass(frozen=True)
class SyntheticDesign:
    """The generator's difficulty knobs; the defaults are the calibrated design
    (``benchmarks/synthetic_calibration.py``). Lengths are pixels of a 64x64 image and scale with
    ``image_size``; ``(low, high)`` pairs are uniform ranges drawn per object or per image."""

    num_object_classes: int = 5  # the first N texture families of CLASSES
    objects: tuple[int, int] = (3, 6)  # objects per image, inclusive; later ones occlude earlier ones
    radius: tuple[float, float] = (10.0, 20.0)  # object radius
    period: tuple[float, float] = (5.5, 6.5)  # texture period; orientation and phase are uniform
    sharpness: tuple[float, float] = (5.0, 10.0)  # of the texture's colour transitions (soft .. hard)
    hue_spread: float = 30.0  # degrees: class k's hue is k/N of the circle +- this (180: any hue)
    saturation: tuple[float, float] = (0.3, 1.0)  # of an object's first colour
    value: tuple[float, float] = (0.35, 1.0)
    contrast: tuple[float, float] = (0.5, 0.9)  # the second colour: this far towards black or white
    distractors: tuple[int, int] = (1, 4)  # untextured shapes of any colour on the background
    speckle: tuple[float, float] = (0.0, 0.12)  # amplitude of fine background noise
    background_saturation: float = 1.0  # 0: grey background and distractors
    noise: tuple[float, float] = (0.01, 0.06)  # per-pixel sensor noise sigma
    ignore_border: bool = True  # mark the anti-aliased rims of objects 255


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
    num_val: int = 200,
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
    if not 0 <= design.hue_spread <= 180:
        raise ValueError(f"hue_spread must be in [0, 180] degrees, but got {design.hue_spread}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, but got {image_size}")
    out_dir = Path(out_dir)
    for sub in ("images", "masks", "splits"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": num_train, "val": num_val}

    def write_chunk(job: tuple[int, str, int]) -> None:
        split_code, split, start = job
        images, masks = _render_chunk_at(seed, split_code, start, splits[split] - start, image_size, design)
        for i, (image, mask) in enumerate(zip(images, masks), start=start):
            Image.fromarray(image, mode="RGB").save(out_dir / "images" / f"{split}_{i:05d}.png", compress_level=1)
            Image.fromarray(mask, mode="L").save(out_dir / "masks" / f"{split}_{i:05d}.png", compress_level=1)

    jobs = [(code, split, start) for code, (split, count) in enumerate(splits.items()) for start in range(0, count, _CHUNK)]
    # Threads, not processes: numpy's array maths and PIL's PNG encoder release the GIL, and a
    # thread is safe to start inside Ray workers where a fork is not.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write_chunk, jobs))  # list(): re-raises a chunk's error here
    # Written last: their presence marks the dataset complete (is_dataset).
    meta = {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "design": asdict(design)}
    (out_dir / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "classes.txt").write_text("\n".join(CLASSES[: design.num_object_classes + 1]) + "\n")
    for split, count in splits.items():
        (out_dir / "splits" / f"{split}.txt").write_text("".join(f"{split}_{i:05d}\n" for i in range(count)))
    return out_dir


# --------------------------------------------------------------------------------------- rendering
#
# Images are rendered in chunks of _CHUNK, vectorised over the chunk: every array below is
# (N, H, W) or (N, H, W, 3), and per-image parameters are (N, 1, 1). A chunk draws from its own
# generator seeded by (seed, split, chunk), so image i of a split is the same whatever the split's
# size (a tiny test dataset is a prefix of the full one).

_CHUNK = 32


def _render_chunk_at(seed: int, split_code: int, start: int, count: int, size: int, design: SyntheticDesign):
    """Images ``start .. start + min(count, _CHUNK)`` of a split: (n, H, W, 3) and (n, H, W) uint8."""
    rng = np.random.default_rng([seed, split_code, start // _CHUNK])
    images, masks = _render_chunk(rng, _CHUNK, size, design)
    return images[:count], masks[:count]


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
    grey = image.mean(axis=-1, keepdims=True)
    image = grey + design.background_saturation * (image - grey)

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
        angle = _uniform(rng, (0, np.pi), n)
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
        t = 1 / (1 + np.exp(-_uniform(rng, design.sharpness, n) * signed))  # (n, H, W) soft two-colour mix
        # Each class has a typical hue, as real classes do (sky, grass), and neighbours overlap;
        # the second colour is the first pushed towards black or white, so the texture is mostly a
        # pattern of lightness.
        hue = (cls - 1) / design.num_object_classes + rng.uniform(-1, 1, n) * design.hue_spread / 360
        first = _hsv_to_rgb(hue, rng.uniform(*design.saturation, n), rng.uniform(*design.value, n))
        towards = (rng.random((n, 1)) < 0.5).astype(np.float32)  # (n, 1): black or white
        second = first + rng.uniform(*design.contrast, (n, 1)).astype(np.float32) * (towards - first)
        colour = t[..., None] * first[:, None, None] + (1 - t[..., None]) * second[:, None, None]
        shading = 1 + _uniform(rng, (-0.35, 0.35), n) * u / (design.radius[1] * scale)
        image = image * (1 - alpha[..., None]) + colour * (shading * alpha)[..., None]
        inside = alpha >= 0.5
        mask[inside] = np.broadcast_to(cls[:, None, None], mask.shape)[inside]
        # An object's anti-aliased rim is ignored; an object painted over a rim claims it back.
        rim = (alpha > 0.15) & (alpha < 0.85)
        border = (border & ~inside) | rim

    image = image * _uniform(rng, (0.75, 1.2), n)[..., None]
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * _uniform(rng, design.noise, n)[..., None]
    if design.ignore_border:
        mask[border] = IGNORE_INDEX
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask
