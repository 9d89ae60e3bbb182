"""DataLoaders for one training worker, and an endless iterator over one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from selftune.errors import ConfigError


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of this worker's shard of ``dataset``.

    With ``world_size > 1`` a ``DistributedSampler`` shards the data (the same ``seed`` on every
    rank, so the shards are disjoint); call ``loader.sampler.set_epoch(epoch)`` each epoch, or
    iterate through ``cycle``. Otherwise shuffling draws from a generator seeded with ``seed``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    # Worker processes and augmentations are seeded from this generator; mixing in the rank keeps
    # rank 0's worker 0 from augmenting exactly like rank 1's worker 0.
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
    )


class InfiniteLoader:
    """Iterates ``loader`` forever, starting a new epoch (and ``sampler.set_epoch``) whenever it
    runs out: for drawing labelled and unlabelled batches side by side."""

    def __init__(self, loader: DataLoader, *, start_epoch: int = 0) -> None:
        if len(loader) == 0:
            raise ConfigError(
                f"the loader yields no batches ({len(loader.dataset)} samples, batch_size={loader.batch_size}, "
                f"drop_last={loader.drop_last}); use a smaller batch size or drop_last=False"
            )
        self.loader = loader
        self.epoch = start_epoch
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        while True:
            if self._batches is None:
                set_epoch = getattr(self.loader.sampler, "set_epoch", None)
                if set_epoch is not None:
                    set_epoch(self.epoch)
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None
                self.epoch += 1


def cycle(loader: DataLoader, *, start_epoch: int = 0) -> InfiniteLoader:
    """``InfiniteLoader(loader)``: endless batches, a fresh shuffle each pass."""
    return InfiniteLoader(loader, start_epoch=start_epoch)
