"""DataLoaders for one training worker, and an endless iterator over one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from selftune.data.index import IGNORE_INDEX
from selftune.errors import ConfigError

# What pad_collate fills the area it adds with, per item key (every other key collates as usual).
_PAD_FILL: dict[str, float | int | bool] = {"image": 0.0, "mask": IGNORE_INDEX, "valid": False}


def pad_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch ``SegmentationDataset`` items of different sizes.

    Each item is padded at the bottom and right to the largest height and width in the batch:
    ``image`` with 0 (after normalisation), ``mask`` with 255 (ignored by losses and metrics) and
    ``valid`` with False. ``size`` is a long (B, 2) tensor of every item's own (H, W) (from the
    item's ``size``, else its image), so a prediction can be cropped back with
    ``pred[k, :, :h, :w]``. Other entries collate as ``default_collate`` does; a batch of equal
    sizes comes out exactly as ``default_collate`` would make it.
    """
    if not items:
        raise ValueError("pad_collate needs at least one item")
    if not all(isinstance(item, Mapping) and "image" in item for item in items):
        raise TypeError("pad_collate batches dict items with an 'image' tensor (as SegmentationDataset returns)")
    sizes = torch.tensor([tuple(item["image"].shape[-2:]) for item in items], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = _pad_stack(values, key, height, width) if key in _PAD_FILL else default_collate(values)
    batch.setdefault("size", sizes)
    return batch


def _pad_stack(values: list[torch.Tensor], key: str, height: int, width: int) -> torch.Tensor:
    first = values[0]
    out = torch.full((len(values), *first.shape[:-2], height, width), _PAD_FILL[key], dtype=first.dtype)
    for k, value in enumerate(values):
        if value.shape[:-2] != first.shape[:-2]:
            raise ValueError(f"pad_collate: {key!r} of item {k} has shape {tuple(value.shape)}, "
                             f"item 0 has {tuple(first.shape)}; only the last two (H, W) may differ")
        out[k, ..., : value.shape[-2], : value.shape[-1]] = value
    return out


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
    pad: bool = False,
) -> DataLoader:
    """Batches of this worker's shard of ``dataset``.

    With ``world_size > 1`` a ``DistributedSampler`` shards the data (the same ``seed`` on every
    rank, so the shards are disjoint); call ``loader.sampler.set_epoch(epoch)`` each epoch, or
    iterate through ``cycle``. Otherwise shuffling draws from a generator seeded with ``seed``.

    ``pad=True`` batches items of different sizes (un-resized VOC images for evaluation or
    pseudo-labelling) through ``pad_collate``: padded to the batch's largest H and W, mask 255 and
    ``valid`` False in the padding, each item's own size in ``batch["size"]``. Without it items
    must share one size (``default_collate``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    # Worker processes and augmentations are seeded from this generator; mixing in the rank keeps
    # rank 0's worker 0 from augmenting exactly like rank 1's worker 0.
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    if num_workers == 0 and hasattr(dataset, "seed_augmentations"):
        # No worker processes to reseed them: seed the augmentations here, or runs are not repeatable.
        dataset.seed_augmentations(seed + 1_000_003 * rank)
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
        collate_fn=pad_collate if pad else None,
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


T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """``items`` in order, produced up to ``depth`` ahead on a thread: the next batch is decoded
    while the caller's model runs on this one (PIL's decoder and torch's kernels release the
    GIL). An error in the producer is raised here; leaving the loop early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((_DONE, exc))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
