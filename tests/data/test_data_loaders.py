from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from selftune.data import Sample, SegmentationDataset, cycle, make_loader, weak_augmentation
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
