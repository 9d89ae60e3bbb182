"""Three-stage self-training: losses by hand and the geometric transform's alignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selftune.methods import three_stage
from selftune.methods.three_stage import GeometricTransform

IGNORE = 255


def _transform(batch: int = 1, *, flip=False, scale=1.0, offset=(0.0, 0.0), rotation=0.0) -> GeometricTransform:
    return GeometricTransform(
        flip=torch.full((batch,), flip),
        scale=torch.full((batch,), float(scale)),
        offset=torch.tensor([offset] * batch, dtype=torch.float32),
        rotation=torch.full((batch,), float(rotation)),
    )


def test_consistency_loss_uses_the_teachers_hard_labels():
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    teacher = torch.tensor([[[[0.2, 5.0]], [[0.1, 4.0]]]])  # argmax: class 0 at both pixels
    ce_a = -math.log(math.exp(1) / (math.exp(1) + 1))  # student pixel a, class 0
    ce_b = -math.log(1 / (1 + math.exp(2)))  # student pixel b, class 0
    assert three_stage.consistency_loss(student, teacher).item() == pytest.approx((ce_a + ce_b) / 2, rel=1e-6)
    ignore = torch.tensor([[[False, True]]])
    assert three_stage.consistency_loss(student, teacher, ignore).item() == pytest.approx(ce_a, rel=1e-6)
    assert three_stage.consistency_loss(student, teacher, torch.ones_like(ignore)).item() == 0.0


def test_pseudo_label_loss_and_total_loss():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    labels[0, 0] = IGNORE
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert three_stage.pseudo_label_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    total = three_stage.total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), 0.5, 0.25)
    assert total.item() == 1.0 + 0.5 * 2.0 + 0.25 * 4.0


def test_identity_and_flip_by_hand():
    image = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])  # (1, 1, 2, 3)
    labels = torch.tensor([[[0, 1, 2], [3, 4, 5]]])
    identity = _transform()
    assert torch.allclose(three_stage.apply_geometric_transform(image, identity), image)
    assert torch.equal(three_stage.apply_geometric_transform(labels, identity, mode="nearest"), labels)
    flip = _transform(flip=True)
    assert torch.allclose(three_stage.apply_geometric_transform(image, flip), image.flip(-1))
    assert torch.equal(three_stage.apply_geometric_transform(labels, flip, mode="nearest"), labels.flip(-1))


def test_one_pixel_shift_fills_outside_with_255():
    image = torch.arange(8, dtype=torch.float32).view(1, 1, 2, 4)
    labels = torch.arange(8).view(1, 2, 4)
    shift = _transform(offset=(2 / 4, 0.0))  # one pixel of a 4-wide image: output[x] = input[x + 1]
    moved_image = three_stage.apply_geometric_transform(image, shift)
    moved_labels = three_stage.apply_geometric_transform(labels, shift, mode="nearest")
    assert moved_labels.tolist() == [[[1, 2, 3, IGNORE], [5, 6, 7, IGNORE]]]
    assert moved_image[0, 0].tolist() == [[1.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 0.0]]
    filled = three_stage.apply_geometric_transform(image, shift, fill=-1.0)
    assert filled[0, 0, :, 3].tolist() == [-1.0, -1.0]
    assert three_stage.transform_valid_mask(shift, (2, 4)).tolist() == [[[True, True, True, False]] * 2]


def _blocky_labels(batch: int, size: int, block: int, classes: int, seed: int) -> torch.Tensor:
    coarse = torch.randint(0, classes, (batch, size // block, size // block), generator=torch.Generator().manual_seed(seed))
    return coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)  # (B, size, size)


def test_image_and_label_map_stay_aligned_under_random_transforms():
    generator = torch.Generator().manual_seed(0)
    labels = _blocky_labels(batch=4, size=32, block=8, classes=5, seed=1)
    one_hot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()  # image whose argmax is the label
    params = three_stage.sample_geometric_transform(4, generator, scale_range=(0.8, 1.6), max_rotation_degrees=20)
    moved_labels = three_stage.apply_geometric_transform(labels, params, mode="nearest")
    moved_image = three_stage.apply_geometric_transform(one_hot, params, mode="bilinear")
    nearest_image = three_stage.apply_geometric_transform(one_hot, params, mode="nearest")
    valid = three_stage.transform_valid_mask(params, (32, 32))
    assert torch.equal(moved_labels == IGNORE, ~valid)  # 255 exactly where the input was left
    assert torch.equal(nearest_image.argmax(1)[valid], moved_labels[valid])
    agreement = (moved_image.argmax(1)[valid] == moved_labels[valid]).float().mean().item()
    assert agreement > 0.95  # bilinear may differ only next to block corners


def test_rotation_by_hand_and_resolution_independence():
    labels = torch.arange(16).view(1, 4, 4)
    quarter_turn = _transform(rotation=math.pi / 2)
    rotated = three_stage.apply_geometric_transform(labels, quarter_turn, mode="nearest")
    assert torch.equal(rotated, torch.rot90(labels, 1, dims=(-2, -1)))  # out[y][x] = in[x][W-1-y]
    wide = torch.arange(6).view(1, 2, 3)  # non-square: a half turn is a flip of both axes
    half_turn = three_stage.apply_geometric_transform(wide, _transform(rotation=math.pi), mode="nearest")
    assert torch.equal(half_turn, wide.flip(-1).flip(-2))
    # quarter turn on a 2 x 4 image, measured in pixels: output (r, c) at centred pixel coordinates
    # (u, v) = (c - 1.5, r - 0.5) reads input (u', v') = (-v, u), i.e. in[c - 1][2 - r]; columns 0 and 3
    # land at |v'| = 1.5, outside the 2-pixel-high input
    strip = torch.arange(8).view(1, 2, 4)
    turned = three_stage.apply_geometric_transform(strip, quarter_turn, mode="nearest")
    assert turned.tolist() == [[[IGNORE, 2, 6, IGNORE], [IGNORE, 1, 5, IGNORE]]]
    params = three_stage.sample_geometric_transform(3, torch.Generator().manual_seed(5), max_rotation_degrees=30)
    # the matrix depends on the aspect ratio only: a score map at 1/4 resolution moves the same way
    assert torch.allclose(params.theta((8, 12)), params.theta((32, 48)))


def test_zoom_in_never_reads_outside_and_zoom_out_fills():
    generator = torch.Generator().manual_seed(3)
    labels = _blocky_labels(batch=8, size=16, block=4, classes=3, seed=2)
    zoom_in = three_stage.sample_geometric_transform(8, generator, scale_range=(1.0, 2.0))
    assert not (three_stage.apply_geometric_transform(labels, zoom_in, mode="nearest") == IGNORE).any()
    zoom_out = _transform(8, scale=0.5)  # the image covers the central half of the output
    moved = three_stage.apply_geometric_transform(labels, zoom_out, mode="nearest")
    assert (moved[:, :4, :] == IGNORE).all() and (moved[:, :, -4:] == IGNORE).all()
    assert not (moved[:, 4:12, 4:12] == IGNORE).any()


def test_sampling_is_reproducible_and_validated():
    first = three_stage.sample_geometric_transform(5, torch.Generator().manual_seed(7))
    second = three_stage.sample_geometric_transform(5, torch.Generator().manual_seed(7))
    assert torch.equal(first.theta((4, 6)), second.theta((4, 6)))
    assert first.theta((4, 6)).shape == (5, 2, 3)
    with pytest.raises(ValueError, match="scale_range"):
        three_stage.sample_geometric_transform(2, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="need mode='nearest'"):
        three_stage.apply_geometric_transform(torch.zeros(1, 2, 2, dtype=torch.long), _transform(), mode="bilinear")


def test_transformed_teacher_labels():
    teacher = torch.tensor([[[[0.0, 9.0, 0.0]], [[1.0, 0.0, 2.0]]]])  # argmax (1, 0, 1)
    labels = three_stage.transformed_teacher_labels(teacher, _transform(flip=True))
    assert labels.tolist() == [[[1, 0, 1]]]
    shifted = three_stage.transformed_teacher_labels(teacher, _transform(offset=(2 / 3, 0.0)))
    assert shifted.tolist() == [[[0, 1, IGNORE]]]


# --------------------------------------------------------------------------------------------
# B moves the target with the image: translate, shear, all ops together; Cutout
# --------------------------------------------------------------------------------------------


def _square(size: int, top: int, left: int, side: int, cls: int = 1) -> torch.Tensor:
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[0, top:top + side, left:left + side] = cls
    return labels


@pytest.mark.parametrize("k", [1, 3])
def test_translate_by_k_pixels_moves_image_and_mask_by_k(k):
    labels = _square(8, top=2, left=2, side=3)
    image = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()  # (1, 2, 8, 8): channel 1 is the square
    right_by_k = _transform(offset=(-2 * k / 8, 0.0))  # normalised units: 2 / W per pixel
    moved_labels = three_stage.apply_geometric_transform(labels, right_by_k, mode="nearest")
    moved_image = three_stage.apply_geometric_transform(image, right_by_k)
    expected = _square(8, top=2, left=2 + k, side=3)
    expected[0, :, :k] = IGNORE  # the k columns brought in from outside
    assert torch.equal(moved_labels, expected)
    assert torch.allclose(moved_image[0, 1], _square(8, 2, 2 + k, 3)[0].float(), atol=1e-6)  # bilinear, exact shift


def test_shear_by_hand():
    # 5 x 5, k_x = 1: output (r, c) reads input (r, c + (r - 2)) in centred pixel units; outside -> 255
    labels = torch.arange(25).view(1, 5, 5)
    sheared = GeometricTransform(
        torch.zeros(1, dtype=torch.bool), torch.ones(1), torch.zeros(1, 2), torch.zeros(1), torch.tensor([[1.0, 0.0]])
    )
    out = three_stage.apply_geometric_transform(labels, sheared, mode="nearest")
    expected = [[labels[0, r, c + r - 2].item() if 0 <= c + r - 2 < 5 else IGNORE for c in range(5)] for r in range(5)]
    assert out[0].tolist() == expected
    assert out[0, 2].tolist() == labels[0, 2].tolist()  # the centre row does not move


def test_rotation_of_a_constructed_mask_equals_rot90():
    labels = _square(6, top=0, left=1, side=2, cls=3) + 2 * _square(6, top=3, left=4, side=2)
    quarter = three_stage.apply_geometric_transform(labels, _transform(rotation=math.pi / 2), mode="nearest")
    assert torch.equal(quarter, torch.rot90(labels, 1, dims=(-2, -1)))
    image = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert torch.allclose(three_stage.apply_geometric_transform(image, _transform(rotation=math.pi / 2)),
                          torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5)


def test_all_ops_together_keep_image_and_mask_aligned():
    generator = torch.Generator().manual_seed(4)
    labels = _blocky_labels(batch=6, size=32, block=8, classes=5, seed=3)
    one_hot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    params = three_stage.sample_geometric_transform(
        6, generator, scale_range=(0.8, 1.5), max_rotation_degrees=30, max_shear=0.3, max_translate=10 / 32,
    )
    assert params.shear is not None and params.shear.abs().max() <= 0.3
    moved_labels = three_stage.apply_geometric_transform(labels, params, mode="nearest")
    valid = three_stage.transform_valid_mask(params, (32, 32))
    assert torch.equal(moved_labels == IGNORE, ~valid)
    nearest_image = three_stage.apply_geometric_transform(one_hot, params, mode="nearest")
    assert torch.equal(nearest_image.argmax(1)[valid], moved_labels[valid])
    bilinear = three_stage.apply_geometric_transform(one_hot, params).argmax(1)
    assert (bilinear[valid] == moved_labels[valid]).float().mean() > 0.9


def test_new_options_off_leave_the_former_draws_unchanged():
    former = three_stage.sample_geometric_transform(4, torch.Generator().manual_seed(9), max_rotation_degrees=10)
    now = three_stage.sample_geometric_transform(
        4, torch.Generator().manual_seed(9), max_rotation_degrees=10, max_shear=0.0, max_translate=0.0
    )
    assert now.shear is None and torch.equal(former.theta((5, 7)), now.theta((5, 7)))
    with_extras = three_stage.sample_geometric_transform(
        4, torch.Generator().manual_seed(9), max_rotation_degrees=10, max_shear=0.2, max_translate=0.1
    )
    # the former parameters are drawn first, then the new ones
    assert torch.equal(with_extras.rotation, former.rotation) and torch.equal(with_extras.scale, former.scale)
    with pytest.raises(ValueError, match="max_shear"):
        three_stage.sample_geometric_transform(2, max_shear=-0.1)


def test_cutout_squares_by_hand_and_clipped_at_the_border():
    images = torch.ones(2, 3, 4, 4)
    cut = torch.zeros(2, 4, 4, dtype=torch.bool)
    cut[0, 1:3, 1:3] = True
    out = three_stage.apply_cutout(images, cut, fill=0.0)
    assert out[0, :, 1:3, 1:3].eq(0).all() and out[0].sum() == 3 * (16 - 4) and out[1].eq(1).all()
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        mask = three_stage.cutout_mask(4, 20, 24, generator, holes=1, size=6)
        for one in mask:
            rows, cols = one.any(1).nonzero()[:, 0], one.any(0).nonzero()[:, 0]
            assert one.sum() == len(rows) * len(cols) and 1 <= len(rows) <= 6 and 1 <= len(cols) <= 6
    # a square larger than twice the image cuts everything, wherever its centre falls
    assert three_stage.cutout_mask(2, 5, 5, generator, holes=1, size=10).all()
    # the authors' default: 3 squares of 32 px, at most 3 * 32 * 32 pixels
    assert three_stage.cutout_mask(8, 64, 64, generator).sum(dim=(1, 2)).le(3 * 32 * 32).all()
