from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from torch.utils.data import default_collate

from selftune.data import (
    Sample,
    SegmentationDataset,
    cycle,
    eval_transform,
    make_loader,
    open_dataset,
    pad_collate,
    weak_augmentation,
)
from selftune.errors import ConfigError


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def order(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch]


def test_two_ranks_get_disjoint_shards_covering_the_set():
    dataset = Indices(10)
    shards = [order(make_loader(dataset, batch_size=2, shuffle=True, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(10))


def test_distributed_loader_uses_a_seeded_distributed_sampler():
    loader = make_loader(Indices(13), batch_size=2, shuffle=True, rank=1, world_size=3, seed=4, drop_last=True)
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.shuffle) == (3, 1, 4, True)
    assert sampler.num_samples == 4  # drop_last reaches the sampler: 13 -> 12 items, not padded to 15
    epoch0 = order(loader)
    assert len(epoch0) == 4 and epoch0 == order(loader)  # the same epoch gives the same shard
    sampler.set_epoch(1)
    assert order(loader) != epoch0  # a new epoch reshuffles


def test_single_process_shuffle_is_seeded():
    dataset = Indices(30)
    first = order(make_loader(dataset, batch_size=4, shuffle=True, seed=1))
    assert first == order(make_loader(dataset, batch_size=4, shuffle=True, seed=1))
    assert first != order(make_loader(dataset, batch_size=4, shuffle=True, seed=2))
    assert sorted(first) == list(range(30)) and first != list(range(30))
    assert order(make_loader(dataset, batch_size=4, shuffle=False)) == list(range(30))


def test_bad_rank_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.world_size-1, got rank=2, world_size=2"):
        make_loader(Indices(4), batch_size=1, shuffle=False, rank=2, world_size=2)


def test_cycle_runs_past_the_end_and_advances_the_epoch():
    loaders = [make_loader(Indices(6), batch_size=2, shuffle=True, rank=r, world_size=2, seed=0) for r in (0, 1)]
    streams = [cycle(loader) for loader in loaders]
    # each rank holds 3 items: 2 batches (2 + 1) per epoch, so 6 draws span epochs 0, 1 and 2
    drawn = [[[int(i) for i in next(stream)] for _ in range(6)] for stream in streams]
    assert [stream.epoch for stream in streams] == [2, 2]
    assert [loader.sampler.epoch for loader in loaders] == [2, 2]
    per_epoch = [[sum(rank[2 * e:2 * e + 2], []) for e in range(3)] for rank in drawn]
    for e in range(3):  # every epoch, the ranks split the whole set between them
        assert sorted(per_epoch[0][e] + per_epoch[1][e]) == list(range(6))
    assert len({tuple(epoch) for epoch in per_epoch[0]}) > 1  # and the split changes between epochs


def test_cycle_refuses_a_loader_without_batches():
    loader = make_loader(Indices(3), batch_size=4, shuffle=True, drop_last=True)
    with pytest.raises(ConfigError, match=r"the loader yields no batches \(3 samples, batch_size=4, drop_last=True\)"):
        cycle(loader)


def test_worker_processes_do_not_repeat_each_others_augmentations(tmp_path, png):
    rng = np.random.default_rng(0)
    image = png(tmp_path / "i.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    samples = [Sample(f"copy{k}", image, None) for k in range(4)]  # one image, four times
    dataset = SegmentationDataset(samples, num_classes=2, transform=weak_augmentation(8, seed=0), masks="none")
    loader = make_loader(dataset, batch_size=1, shuffle=False, num_workers=2, seed=0)
    assert loader.persistent_workers
    crops = [batch["image"][0] for batch in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[2], crops[3])



def test_in_process_augmentations_repeat_for_a_seed_and_differ_across_seeds(tmp_path, png):
    """With loader_workers 0 (the CPU default) the loader seeds the augmentations itself: the same
    seed gives the same crops run after run (the stage cache and comparisons depend on it)."""
    rng = np.random.default_rng(0)
    image = png(tmp_path / "i.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    samples = [Sample(f"copy{k}", image, None) for k in range(4)]

    def crops(seed: int) -> list[torch.Tensor]:
        # A fresh, unseeded transform each time, as stages build them.
        dataset = SegmentationDataset(samples, num_classes=2, transform=weak_augmentation(8), masks="none")
        return [batch["image"][0] for batch in make_loader(dataset, batch_size=1, shuffle=False, seed=seed)]

    first, again, other = crops(3), crops(3), crops(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))

# ---------------------------------------------------------------------------------------------- padding


def item(height: int, width: int, k: int, *, size: bool = True) -> dict:
    """A dataset-like item whose image is filled with k + 1 and whose mask is k."""
    out = {
        "image": torch.full((3, height, width), float(k + 1)),
        "mask": torch.full((height, width), k, dtype=torch.long),
        "valid": torch.ones(height, width, dtype=torch.bool),
        "id": f"s{k}",
        "index": k,
    }
    if size:
        out["size"] = torch.tensor([height, width])
    return out


@pytest.mark.parametrize("with_size", [True, False])
def test_pad_collate_pads_to_the_largest_height_and_width(with_size):
    shapes = [(2, 5), (4, 3), (3, 6)]
    batch = pad_collate([item(h, w, k, size=with_size) for k, (h, w) in enumerate(shapes)])
    assert batch["image"].shape == (3, 3, 4, 6) and batch["mask"].shape == batch["valid"].shape == (3, 4, 6)
    assert batch["mask"].dtype == torch.int64 and batch["valid"].dtype == torch.bool
    assert batch["size"].dtype == torch.int64 and batch["size"].tolist() == [list(s) for s in shapes]
    assert batch["id"] == ["s0", "s1", "s2"] and batch["index"].tolist() == [0, 1, 2]
    for k, (h, w) in enumerate(shapes):
        inside = torch.zeros(4, 6, dtype=torch.bool)
        inside[:h, :w] = True  # each item sits in the top-left corner
        assert (batch["image"][k][:, inside] == k + 1).all() and (batch["image"][k][:, ~inside] == 0).all()
        assert (batch["mask"][k][inside] == k).all() and (batch["mask"][k][~inside] == 255).all()
        assert torch.equal(batch["valid"][k], inside)


def test_equal_sizes_collate_as_without_padding(tmp_path, make_folder):
    items = [item(3, 4, k) for k in range(3)]
    padded, plain = pad_collate(items), default_collate(items)
    assert list(padded) == list(plain)
    for key in ("image", "mask", "valid", "size", "index"):
        assert padded[key].dtype == plain[key].dtype and torch.equal(padded[key], plain[key])
    assert padded["id"] == plain["id"]

    index = open_dataset("folder", make_folder(tmp_path / "d", train=["t0", "t1", "t2"], val=["v0"]))
    dataset = SegmentationDataset(index.train, num_classes=3, transform=eval_transform())
    for with_pad, without in zip(make_loader(dataset, batch_size=2, shuffle=False, pad=True),
                                 make_loader(dataset, batch_size=2, shuffle=False), strict=True):
        assert with_pad["id"] == without["id"]
        assert all(torch.equal(with_pad[key], without[key]) for key in ("image", "mask", "valid", "size", "index"))
        assert without["size"].tolist() == [[12, 16]] * len(without["id"])


def test_folder_images_of_mixed_sizes_batch_with_pad(tmp_path, make_folder):
    sizes = {"a": (12, 16), "b": (9, 20), "c": (14, 7)}
    root = make_folder(tmp_path / "d", train=["a", "b", "c"], val=["a"], sizes=sizes, jpg=("b",))
    index = open_dataset("folder", root)
    dataset = SegmentationDataset(index.train, num_classes=3, transform=eval_transform())
    with pytest.raises(RuntimeError):  # what pad=True is for
        next(iter(make_loader(dataset, batch_size=3, shuffle=False)))
    (batch,) = list(make_loader(dataset, batch_size=3, shuffle=False, pad=True))
    assert batch["image"].shape == (3, 3, 14, 20) and batch["id"] == ["a", "b", "c"]
    assert batch["size"].tolist() == [[12, 16], [9, 20], [14, 7]]
    for k, (h, w) in enumerate(sizes.values()):
        own = dataset[k]
        assert torch.equal(batch["image"][k, :, :h, :w], own["image"])
        assert torch.equal(batch["mask"][k, :h, :w], own["mask"])
        assert batch["valid"][k].sum() == h * w and batch["valid"][k, :h, :w].all()
        assert (batch["mask"][k][~batch["valid"][k]] == 255).all()
        assert (batch["image"][k][:, ~batch["valid"][k]] == 0).all()
