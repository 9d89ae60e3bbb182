"""Three-stage self-training (Ke et al.): consistency and pseudo-mask losses, random geometric A/B.

* ``consistency_loss`` (eq. 1): CE of the student on A x against the hard argmax of the EMA
  teacher's output moved by B.
* ``pseudo_label_loss`` (eqs. 3 and 5): CE of the second head on A x against B of the fixed
  pseudo masks of the previous stage.
* ``total_loss`` (eqs. 4 and 5): ``L_seg + lambda1 L_con + lambda2 L_pl``.
* ``sample_geometric_transform`` / ``apply_geometric_transform``: the geometric part of A and B
  — one random flip / zoom / shift / rotation / shear per sample, applied identically to an
  image (bilinear), a score map (bilinear) or a label map (nearest, 255 outside the image).
* ``cutout_mask`` / ``apply_cutout``: the always-on Cutout of A (the authors: 3 squares of
  32 px per image, set to 0 in the normalised image), on the image only, after the warp. The
  rest of A's photometric part (RandAugment-style ops) is a data transform.

The EMA teacher is ``selftune.methods.common.ema_update`` (all float state, as the authors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selftune.methods.common import IGNORE_INDEX, box_mask, masked_cross_entropy

__all__ = [
    "GeometricTransform",
    "apply_cutout",
    "apply_geometric_transform",
    "consistency_loss",
    "cutout_mask",
    "pseudo_label_loss",
    "sample_geometric_transform",
    "total_loss",
    "transform_valid_mask",
    "transformed_teacher_labels",
]


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits_transformed: torch.Tensor,
    ignore_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1 with d_c = cross-entropy against the teacher's hard labels (the authors' choice).

    student_logits: (B, C, H, W) = f_theta(A x); teacher_logits_transformed: (B, C, H, W) =
    B f_theta'(x), the EMA teacher's scores moved by the same geometric transform (no gradient is
    taken through them); ignore_mask: optional bool (B, H, W), True where the pixel takes no part
    — at least the pixels the transform brought in from outside the image
    (``~transform_valid_mask(params, (H, W))``). Mean over the remaining pixels (eq. 1 writes a
    sum over images); none left -> 0 with the graph kept.

    ``pseudo_label_loss(student_logits, transformed_teacher_labels(teacher_logits, params))`` is
    the same loss with argmax taken before the warp (nearest), which is what the authors' code
    does; the two differ only at region borders.
    """
    target = teacher_logits_transformed.detach().argmax(dim=1)  # (B, H, W)
    if ignore_mask is not None:
        target = torch.where(ignore_mask, torch.full_like(target, IGNORE_INDEX), target)
    return masked_cross_entropy(student_logits, target)


def pseudo_label_loss(
    logits: torch.Tensor, transformed_pseudo_labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Eq. 3 (and 5's L'_pl): CE of the task-2 head ``g(A x)`` against ``B y_hat``.

    logits: (B, C, H, W); transformed_pseudo_labels: (B, H, W) long, the stored pseudo masks moved
    by ``apply_geometric_transform(..., mode="nearest")`` (255 outside the image). Mean over the
    non-ignored pixels; none -> 0 with the graph kept.
    """
    return masked_cross_entropy(logits, transformed_pseudo_labels, ignore_index)


def total_loss(
    l_seg: torch.Tensor, l_con: torch.Tensor, l_pl: torch.Tensor, lambda1: float, lambda2: float
) -> torch.Tensor:
    """Eq. 4 (stage 2) / eq. 5 (stage 3): ``L_seg + lambda1 * L_con + lambda2 * L_pl``.

    The paper uses lambda1 = lambda2 = 1/2 on Cityscapes; the authors' code weighs CE(GT) by 0.5
    (Cityscapes) or 1 (VOC) and each of the two other terms by 0.25.
    """
    return l_seg + lambda1 * l_con + lambda2 * l_pl


# --------------------------------------------------------------------------------------------
# Random geometric transform (A and B of eq. 1)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeometricTransform:
    """Per-sample parameters of a random flip / zoom / shift / rotation / shear, all (B,) or (B, 2).

    The output pixel at normalised coordinates p (x, y in [-1, 1], ``align_corners=False``)
    reads the input at ``R(rotation) flip(S(shear) p) / scale + offset``: shear ``(k_x, k_y)``
    reads ``(x + k_x y, y + k_y x)`` in pixel units (PIL's ``ShearX`` coefficient, the authors
    draw up to 0.3), flip mirrors x, ``scale > 1`` zooms in (the output shows a ``1/scale``
    window of the input), ``offset`` moves the window's centre (in normalised units: an offset of
    ``-2 k / W`` moves the content ``k`` pixels to the right), rotation is in radians. Rotation
    and shear are measured in pixel space so that they stay a rotation / shear on non-square
    images; the matrix depends only on the aspect ratio, so the same parameters move an image
    and a lower-resolution score map of it consistently. ``shear=None`` is no shear.
    """

    flip: torch.Tensor  # (B,) bool
    scale: torch.Tensor  # (B,) float
    offset: torch.Tensor  # (B, 2) float, (x, y)
    rotation: torch.Tensor  # (B,) float, radians
    shear: torch.Tensor | None = None  # (B, 2) float, (k_x, k_y) pixel-space coefficients

    @property
    def batch_size(self) -> int:
        return self.flip.shape[0]

    def theta(self, size: tuple[int, int]) -> torch.Tensor:
        """The (B, 2, 3) ``F.affine_grid`` matrices for an output of ``size`` = (H, W)."""
        height, width = size
        cos, sin = torch.cos(self.rotation), torch.sin(self.rotation)
        mirror = torch.where(self.flip, -1.0, 1.0).to(self.scale.dtype)
        inv_scale = 1.0 / self.scale
        # R in normalised coordinates = D^-1 R_pixels D with D = diag(W, H): aspect-correct.
        a = torch.stack(
            [
                torch.stack([cos * mirror, -sin * (height / width)], dim=-1),
                torch.stack([sin * (width / height) * mirror, cos], dim=-1),
            ],
            dim=-2,
        ) * inv_scale[:, None, None]  # (B, 2, 2)
        if self.shear is not None:
            a = a @ self._shear_matrix(height, width)
        return torch.cat([a, self.offset[:, :, None]], dim=2)  # (B, 2, 3)

    def _shear_matrix(self, height: int, width: int) -> torch.Tensor:
        """(B, 2, 2) D^-1 S_pixels D with D = diag(W, H), S_pixels = [[1, k_x], [k_y, 1]]."""
        shear = self.shear.to(self.scale.dtype)  # type: ignore[union-attr]
        ones = torch.ones_like(shear[:, 0])
        return torch.stack(
            [
                torch.stack([ones, shear[:, 0] * (height / width)], dim=-1),
                torch.stack([shear[:, 1] * (width / height), ones], dim=-1),
            ],
            dim=-2,
        )

    def to(self, device: torch.device | str) -> GeometricTransform:
        return GeometricTransform(
            self.flip.to(device), self.scale.to(device), self.offset.to(device), self.rotation.to(device),
            None if self.shear is None else self.shear.to(device),
        )


def sample_geometric_transform(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    flip_prob: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.5),
    max_rotation_degrees: float = 0.0,
    max_shear: float = 0.0,
    max_translate: float = 0.0,
    device: torch.device | str | None = None,
) -> GeometricTransform:
    """Draw one random geometric transform per sample (on the generator's device, then ``device``).

    flip with probability ``flip_prob``; scale uniform in ``scale_range`` (> 1 zooms in, a random
    crop resized to the full size); the window centre uniform in ``[-(1 - 1/s), 1 - 1/s]`` per
    axis, so a zoom-in window stays inside the image (for s < 1 the image stays inside the
    window, the rest being filled); rotation uniform in +-``max_rotation_degrees`` (default 0: the
    rotated corners would bring in filled pixels).

    Off by default, so the draws above stay what they were: ``max_shear`` — shear coefficients
    ``k_x, k_y`` each uniform in +-max_shear (the authors' RandAugment: 0.3); ``max_translate`` —
    a further shift of the content, uniform in +-max_translate of the image size per axis (the
    authors: 10 px). Both bring in filled pixels, which ``apply_geometric_transform`` marks 255.
    """
    low, high = scale_range
    if not 0.0 < low <= high:
        raise ValueError(f"sample_geometric_transform: need 0 < scale_range[0] <= scale_range[1], got {scale_range}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"sample_geometric_transform: flip_prob must lie in [0, 1], got {flip_prob}")
    if max_shear < 0 or max_translate < 0:
        raise ValueError(
            f"sample_geometric_transform: max_shear and max_translate must be >= 0, got {max_shear}, {max_translate}"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    uniform = lambda *shape: torch.rand(*shape, generator=generator, device=gen_device)  # noqa: E731
    flip = uniform(batch) < flip_prob
    scale = low + (high - low) * uniform(batch)
    reach = (1.0 - 1.0 / scale).abs()  # (B,)
    offset = (2.0 * uniform(batch, 2) - 1.0) * reach[:, None]
    rotation = (2.0 * uniform(batch) - 1.0) * math.radians(max_rotation_degrees)
    shear = None
    if max_translate > 0:  # drawn after the others, so the former draws are unchanged
        offset = offset + (2.0 * uniform(batch, 2) - 1.0) * (2.0 * max_translate)  # normalised units span 2
    if max_shear > 0:
        shear = (2.0 * uniform(batch, 2) - 1.0) * max_shear
    transform = GeometricTransform(flip, scale, offset, rotation, shear)
    return transform.to(device) if device is not None else transform


def _grid(params: GeometricTransform, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    theta = params.theta(size).to(like.device, torch.float32 if not like.is_floating_point() else like.dtype)
    return F.affine_grid(theta, [params.batch_size, 1, *size], align_corners=False)  # (B, H, W, 2)


def transform_valid_mask(
    params: GeometricTransform, size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """bool (B, H, W): True where the transformed output reads from inside the input (nearest)."""
    ones = torch.ones(params.batch_size, 1, *size, device=device)
    grid = _grid(params, size, ones)
    return F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] > 0.5


def apply_geometric_transform(
    tensor: torch.Tensor,
    params: GeometricTransform,
    mode: str = "bilinear",
    fill: float | None = None,
) -> torch.Tensor:
    """Move ``tensor`` by ``params``: (B, C, H, W) images / scores, or (B, H, W) label maps.

    mode "bilinear" (images, scores) or "nearest" (label maps: every output value is an input
    value). Pixels read from outside the image get ``fill``: default 0 for float tensors and 255
    (the ignore label) for integer or 3-d label maps. With bilinear the border blends towards
    ``fill`` exactly as constant padding would. Output has the input's shape and dtype.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"apply_geometric_transform: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if tensor.shape[0] != params.batch_size:
        raise ValueError(f"tensor has {tensor.shape[0]} samples but the transform has {params.batch_size}")
    is_label_map = tensor.dim() == 3 or not tensor.is_floating_point()
    if is_label_map and mode != "nearest":
        raise ValueError("apply_geometric_transform: label maps (3-d or integer tensors) need mode='nearest'")
    if fill is None:
        fill = float(IGNORE_INDEX) if is_label_map else 0.0
    source = tensor[:, None] if tensor.dim() == 3 else tensor  # (B, C, H, W)
    values = source if source.is_floating_point() else source.to(torch.float32)  # ids < 2^24 are exact
    size = (values.shape[-2], values.shape[-1])
    grid = _grid(params, size, values)
    moved = F.grid_sample(values, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill != 0.0:
        ones = torch.ones_like(values[:, :1])
        inside = F.grid_sample(ones, grid, mode=mode, padding_mode="zeros", align_corners=False)
        moved = moved + (1.0 - inside) * fill  # outside points contribute fill instead of 0
    moved = moved if source.is_floating_point() else moved.round().to(source.dtype)
    return moved[:, 0] if tensor.dim() == 3 else moved


def transformed_teacher_labels(teacher_logits: torch.Tensor, params: GeometricTransform) -> torch.Tensor:
    """``B argmax f_theta'(x)``: the teacher's hard labels moved by the transform, 255 outside."""
    return apply_geometric_transform(teacher_logits.detach().argmax(dim=1), params, mode="nearest")


# --------------------------------------------------------------------------------------------
# Cutout (the image part of A)
# --------------------------------------------------------------------------------------------


def cutout_mask(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    holes: int = 3,
    size: int = 32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """bool (B, H, W), True in ``holes`` squares of side ``size`` per image: the pixels to cut.

    As the authors' ``cutout_numpy``: each square's centre is uniform over the pixels and the
    square ``[c - size // 2, c + size // 2)`` is clipped at the image border (so a square near
    the border is smaller); squares may overlap. Defaults: the authors' 3 squares of 32 px.
    """
    if holes < 0 or size < 0:
        raise ValueError(f"cutout_mask: holes and size must be >= 0, got holes={holes}, size={size}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    cut = torch.zeros(batch, height, width, dtype=torch.bool, device=gen_device)
    half = size // 2
    for _ in range(holes):
        centre_y = torch.randint(height, (batch,), generator=generator, device=gen_device)
        centre_x = torch.randint(width, (batch,), generator=generator, device=gen_device)
        y0, x0 = (centre_y - half).clamp(min=0), (centre_x - half).clamp(min=0)
        y1, x1 = (centre_y + half).clamp(max=height), (centre_x + half).clamp(max=width)
        cut |= box_mask(x0, y0, x1 - x0, y1 - y0, height, width)
    return cut.to(device) if device is not None else cut


def apply_cutout(images: torch.Tensor, cut: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``images`` (B, C, H, W) with the pixels of ``cut`` (B, H, W) set to ``fill``.

    0 in an ImageNet-normalised image is the mean colour (the authors zero their [-1, 1] image).
    Only the student's image is cut: its targets (B of the teacher output, B of the pseudo
    masks) keep their labels there, as in the authors' code.
    """
    return images.masked_fill(cut.to(images.device)[:, None], fill)
