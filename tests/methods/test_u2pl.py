"""U2PL: entropy partition, ranks, memory bank and the contrastive loss on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selftune.methods import u2pl

IGNORE = 255


def _two_class_probs(p0: list[float]) -> torch.Tensor:
    """(1, 2, 1, n) probabilities with class-0 probability p0 per pixel."""
    first = torch.tensor(p0, dtype=torch.float64)
    return torch.stack([first, 1 - first])[None, :, None, :]


def test_entropy_by_hand():
    probs = _two_class_probs([0.5, 1.0, 0.25])
    expected = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert u2pl.entropy(probs)[0, 0].tolist() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("q", [0.0, 12.5, 33.3, 50.0, 80.0, 99.9, 100.0])
def test_percentile_matches_numpy_linear_interpolation(q):
    values = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert u2pl.percentile(values, q).item() == pytest.approx(np.percentile(values.numpy(), q), rel=1e-12, abs=0)


def test_reliable_mask_keeps_the_lowest_entropy_fraction():
    # ten pixels with distinct entropies: p0 = 0.50, 0.55, ..., 0.95 (entropy falls as p0 rises)
    probs = _two_class_probs([0.5 + 0.05 * i for i in range(10)])
    mask = u2pl.entropy_reliable_mask(probs, alpha=0.3)
    # percentile 70 lies between the 7th and 8th smallest entropy -> the 7 most confident pixels
    assert mask[0, 0].tolist() == [False] * 3 + [True] * 7


def test_reliable_means_strictly_below_the_percentile():
    probs = _two_class_probs([0.5, 0.6, 0.6, 0.9])
    # alpha = 0: the threshold is the maximum entropy, and the pixel at it is still dropped
    assert u2pl.entropy_reliable_mask(probs, alpha=0.0)[0, 0].tolist() == [False, True, True, True]
    # alpha = 0.5: percentile 50 falls on the tied pair (p0 = 0.6): neither is strictly below it
    assert u2pl.entropy_reliable_mask(probs, alpha=0.5)[0, 0].tolist() == [False, False, False, True]


def test_reliable_mask_ignores_pixels_and_follows_the_authors_numpy_rule():
    probs = _two_class_probs([0.5 + 0.05 * i for i in range(10)])
    ignore = torch.zeros(1, 1, 10, dtype=torch.bool)
    ignore[0, 0, [0, 9]] = True
    mask = u2pl.entropy_reliable_mask(probs, alpha=0.25, ignore_mask=ignore)
    # 8 valid pixels, percentile 75 at position 5.25 -> 6 of them kept; ignored pixels never
    assert mask[0, 0].tolist() == [False, False, False, True, True, True, True, True, True, False]
    entropy = u2pl.entropy(probs).numpy()
    threshold = np.percentile(entropy[~ignore.numpy()], 75)  # the authors' line
    assert np.array_equal(mask.numpy(), (entropy < threshold) & ~ignore.numpy())
    assert not u2pl.entropy_reliable_mask(probs, 0.2, ignore_mask=torch.ones_like(ignore)).any()


def test_reliable_pseudo_labels_and_unsupervised_loss():
    probs = _two_class_probs([0.9, 0.2, 0.55, 0.5])
    labels = u2pl.reliable_pseudo_labels(probs, alpha=0.5)
    # entropies: 0.9 and 0.2 lowest; percentile 50 lies between them and the 0.55 pixel
    assert labels.tolist() == [[[0, 1, IGNORE, IGNORE]]]
    logits = torch.zeros(1, 2, 1, 4, requires_grad=True)
    plain = u2pl.unsupervised_loss(logits, labels)
    scaled = u2pl.unsupervised_loss(logits, labels, authors_scaling=True)
    assert plain.item() == pytest.approx(math.log(2))
    assert scaled.item() == pytest.approx(math.log(2) * 4 / 2)  # x B*H*W / N_kept


def test_alpha_schedule():
    assert u2pl.alpha_schedule(0.2, 0, 80) == pytest.approx(0.2)
    assert u2pl.alpha_schedule(0.2, 40, 80) == pytest.approx(0.1)
    assert u2pl.alpha_schedule(0.2, 80, 80) == 0.0
    with pytest.raises(ValueError, match="total_epochs must be > 0"):
        u2pl.alpha_schedule(0.2, 0, 0)


def test_ranks_and_negative_candidate_window():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]).view(1, 5, 1, 1)
    # descending order: class 1 (rank 0), 3 (1), 4 (2), 2 (3), 0 (4)
    assert u2pl.class_ranks(probs).flatten().tolist() == [4, 0, 3, 1, 2]
    window = [bool(u2pl.negative_candidate_mask(probs, c, r_l=1, r_h=3)) for c in range(5)]
    assert window == [False, False, False, True, True]
    window = [bool(u2pl.negative_candidate_mask(probs, c, r_l=3, r_h=20)) for c in range(5)]
    assert window == [True, False, True, False, False]


def test_contrastive_entropy_masks_split_low_and_high():
    probs = _two_class_probs([0.5 + 0.05 * i for i in range(10)])
    low, high = u2pl.contrastive_entropy_masks(probs, alpha=0.2)
    # percentile 20 -> position 1.8: the 2 lowest entropies (p0 = 0.95, 0.90) are <= it;
    # percentile 80 -> position 7.2: the 2 highest (p0 = 0.50, 0.55) are >= it
    assert low[0, 0].tolist() == [False] * 8 + [True] * 2
    assert high[0, 0].tolist() == [True] * 2 + [False] * 8


def test_memory_bank_is_a_fifo_per_class():
    bank = u2pl.ClassMemoryBank(num_classes=2, capacity=[3, 5], dim=2)
    keys = torch.arange(16, dtype=torch.float32).view(8, 2)  # rows k0..k7
    bank.enqueue(0, keys[:2])
    bank.enqueue(0, keys[2:4])
    assert torch.equal(bank.keys(0), keys[1:4])  # k0 dropped, oldest first
    bank.enqueue(0, keys[4:5])
    assert torch.equal(bank.keys(0), keys[2:5])
    bank.enqueue(0, keys[:8])  # more than the capacity at once: the newest 3
    assert torch.equal(bank.keys(0), keys[5:8])
    bank.enqueue(1, keys[:4])
    assert bank.size(1) == 4 and torch.equal(bank.keys(1), keys[:4])
    drawn = bank.sample(0, 20, torch.Generator().manual_seed(0))
    assert drawn.shape == (20, 2)
    assert all(any(torch.equal(row, key) for key in keys[5:8]) for row in drawn)
    with pytest.raises(ValueError, match="class 1 holds no keys"):
        u2pl.ClassMemoryBank(2, 3, 2).sample(1, 4)


def test_contrastive_loss_by_hand():
    anchors = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([2.0, 0.0])  # cosine 1
    negatives = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])  # cosines 0 and -1
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau)))
    assert u2pl.contrastive_loss(anchors, positive, negatives, tau).item() == pytest.approx(expected, rel=1e-6)
    assert u2pl.contrastive_loss(anchors, positive[None], negatives, tau).item() == pytest.approx(expected, rel=1e-6)


def _contrastive_batch():
    """B = 2 (image 0 labelled, image 1 unlabelled), C = 4 classes, 1 x 3 pixels, D = 3."""
    # teacher probabilities per pixel (class order 0..3); ranks noted for class 0
    pixel_probs = [
        [[0.70, 0.10, 0.15, 0.05], [0.20, 0.50, 0.20, 0.10], [0.10, 0.20, 0.30, 0.40]],  # image 0
        [[0.60, 0.20, 0.10, 0.10], [0.05, 0.15, 0.30, 0.50], [0.25, 0.15, 0.40, 0.20]],  # image 1
    ]
    probs = torch.tensor(pixel_probs).permute(0, 2, 1)[:, :, None, :]  # (2, 4, 1, 3)
    labels = torch.tensor([[[0, 1, IGNORE]], [[0, 3, 2]]])  # GT for image 0, pseudo for image 1
    teacher = torch.arange(18, dtype=torch.float32).view(2, 3, 1, 3)  # distinct features (B, D, 1, W)
    student = torch.randn(2, 3, 1, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    low = torch.tensor([[[True, True, False]], [[True, False, False]]])
    high = torch.tensor([[[True, True, False]], [[False, True, True]]])
    labelled = torch.tensor([True, False])
    return student, teacher, probs, labels, low, high, labelled


def _feature(features: torch.Tensor, image: int, column: int) -> torch.Tensor:
    return features[image, :, 0, column]


def test_build_contrastive_samples_follows_the_definitions():
    student, teacher, probs, labels, low, high, labelled = _contrastive_batch()
    bank = u2pl.ClassMemoryBank(num_classes=4, capacity=100, dim=3)
    samples, num_valid = u2pl.build_contrastive_samples(
        student, teacher, probs, labels, low, high, labelled, bank,
        delta_p=0.3, r_l=1, r_h=3, num_queries=5, num_negatives=2, generator=torch.Generator().manual_seed(1),
    )
    # valid classes: candidates = low & label == c -> class 0 (img0 px0, img1 px0) and class 1 (img0 px1)
    assert num_valid == 2
    by_class = {s.cls: s for s in samples}
    # ranks (stable, ties by class index) — image 0: px0 c0 0, c2 1, c1 2, c3 3; px1 c1 0, c0 1, c2 2, c3 3.
    # image 1: px1 c3 0, c2 1, c1 2, c0 3; px2 c2 0, c0 1, c3 2, c1 3.
    # Labelled negatives of c: high & rank(c) < 1 & label != c -> none here (px0 is class 0, px1 is class 1).
    # Unlabelled negatives of c: high (px1, px2) & rank(c) in [1, 3):
    #   class 0 <- px2 (rank 1); class 1 <- px1 (rank 2); class 2 <- px1 (rank 1); class 3 <- px2 (rank 2)
    assert torch.equal(bank.keys(0), _feature(teacher, 1, 2)[None])
    assert torch.equal(bank.keys(1), _feature(teacher, 1, 1)[None])
    assert torch.equal(bank.keys(2), _feature(teacher, 1, 1)[None])
    assert torch.equal(bank.keys(3), _feature(teacher, 1, 2)[None])
    # class 0 anchors: candidates with teacher p_0 > 0.3 -> img0 px0 (0.7) and img1 px0 (0.6)
    allowed = [_feature(student, 0, 0), _feature(student, 1, 0)]
    anchors = by_class[0].anchors
    assert anchors.shape == (5, 3)
    assert all(any(torch.equal(row, a) for a in allowed) for row in anchors)
    positive = (_feature(teacher, 0, 0) + _feature(teacher, 1, 0)) / 2
    assert torch.allclose(by_class[0].positive, positive)
    assert by_class[0].negatives.shape == (5, 2, 3)
    assert torch.equal(by_class[0].negatives, _feature(teacher, 1, 2).expand(5, 2, 3))
    # class 1: candidate img0 px1 has p_1 = 0.5 > 0.3 -> anchors are that student feature
    assert torch.equal(by_class[1].anchors, _feature(student, 0, 1).expand(5, 3))

    loss = u2pl.memory_bank_contrastive_loss(samples, num_valid, temperature=0.5, like=student)
    expected = sum(u2pl.contrastive_loss(s.anchors, s.positive, s.negatives, 0.5) for s in samples) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_labelled_negatives_are_top_ranked_other_classes():
    student, teacher, probs, labels, low, high, labelled = _contrastive_batch()
    bank = u2pl.ClassMemoryBank(num_classes=4, capacity=100, dim=3)
    u2pl.build_contrastive_samples(
        student, teacher, probs, labels, low, high, labelled, bank, r_l=2, r_h=3, num_queries=2, num_negatives=1
    )
    # labelled image 0, pixel 1 (label 1, high): class 0 ranks 1 < r_l = 2 and 0 != 1 -> negative of class 0
    assert any(torch.equal(key, _feature(teacher, 0, 1)) for key in bank.keys(0))
    # pixel 0 (label 0): class 0 is its own label -> never a negative of class 0
    assert not any(torch.equal(key, _feature(teacher, 0, 0)) for key in bank.keys(0))


def test_contrastive_term_is_zero_with_fewer_than_two_classes():
    student, teacher, probs, labels, low, high, labelled = _contrastive_batch()
    low = torch.zeros_like(low)
    low[0, 0, 0] = True  # only class 0 has a candidate
    bank = u2pl.ClassMemoryBank(num_classes=4, capacity=10, dim=3)
    samples, num_valid = u2pl.build_contrastive_samples(
        student, teacher, probs, labels, low, high, labelled, bank, r_l=1, r_h=3, num_queries=2, num_negatives=1
    )
    assert num_valid == 1
    loss = u2pl.memory_bank_contrastive_loss(samples, num_valid, 0.5, like=student)
    assert loss.item() == 0.0 and loss.requires_grad


# --------------------------------------------------------------------------------------------
# The memory bank under DDP: every worker holds the same keys
# --------------------------------------------------------------------------------------------


def _rank_keys(rank: int, cls: int) -> torch.Tensor:
    """Different keys, in different numbers, per rank and class (rank 0 has none for class 1)."""
    count = {(0, 0): 3, (1, 0): 1, (0, 1): 0, (1, 1): 2}[(rank, cls)]
    return torch.arange(count * 2, dtype=torch.float32).view(count, 2) + 100 * rank + 10 * cls


def _bank_worker(rank: int, world_size: int, folder: str) -> None:
    """Enqueue this rank's keys into a gathering bank and a per-worker one; save both."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        bank = u2pl.ClassMemoryBank(2, [3, 5], 2)
        local = u2pl.ClassMemoryBank(2, [3, 5], 2, gather=False)
        for cls in range(2):
            bank.enqueue(cls, _rank_keys(rank, cls))
            local.enqueue(cls, _rank_keys(rank, cls))
        torch.save({"bank": [bank.keys(0), bank.keys(1)], "local": local.keys(0)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_memory_bank_is_the_same_on_two_gloo_workers(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_bank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    held = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, state in enumerate(held):
        # class 0: 3 + 1 keys gathered, capacity 3 keeps the newest (rank 0's last two, rank 1's one)
        assert torch.equal(state["bank"][0], torch.cat([_rank_keys(0, 0), _rank_keys(1, 0)])[-3:]), rank
        assert torch.equal(state["bank"][1], _rank_keys(1, 1)), rank
        assert torch.equal(state["local"], _rank_keys(rank, 0)), rank  # gather=False: per worker
    assert all(torch.equal(a, b) for a, b in zip(held[0]["bank"], held[1]["bank"]))  # both workers hold the same bank


def test_memory_bank_without_a_process_group_is_unchanged():
    bank = u2pl.ClassMemoryBank(1, 3, 2)
    bank.enqueue(0, torch.ones(2, 2))
    bank.enqueue(0, 2 * torch.ones(2, 2))
    assert bank.keys(0).tolist() == [[1, 1], [2, 2], [2, 2]]
