"""Data order and per-sample randomness that depend only on (seed, epoch, position).

Every training sample is drawn with its own seed, so random crops and flips come out the same
whatever the number of workers, whether the epoch was interrupted and resumed, and however the
samples are spread over processes. The epoch's order is the permutation a
``DistributedSampler`` would draw (``torch.randperm`` seeded with ``seed + epoch``), so a run on N
processes sees, step by step, the same global batches as one process with N times the batch.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import FcnsegError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A well-mixed 63-bit seed for the sample at ``position`` of ``epoch``."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


class ShardSampler(Sampler):
    """Yields ``(index, sample_seed)`` for this process's share of one epoch, from ``start`` on.

    Like ``DistributedSampler``: the order is padded (repeating its head) to a multiple of
    ``world``, so every process gets as many samples; process ``rank`` takes positions
    ``rank, rank + world, ...``. ``start`` skips the
    first ``start`` samples *of this process* (resuming inside an epoch).
    """

    def __init__(self, n: int, seed: int = 0, epoch: int = 0, world: int = 1, rank: int = 0, shuffle: bool = True,
                 start: int = 0, order: list[int] | None = None):
        self.n, self.seed, self.epoch, self.world, self.rank = n, seed, epoch, world, rank
        self.order = list(order) if order is not None else epoch_order(n, seed, epoch, shuffle)
        self.per_rank = -(-n // world)
        self.start = start

    def padded(self) -> list[int]:
        total = self.per_rank * self.world
        order = self.order
        while len(order) < total:
            order = order + self.order[: total - len(order)]
        return order

    def positions(self) -> list[int]:
        return list(range(self.rank, self.per_rank * self.world, self.world))[self.start:]

    def __iter__(self):
        order = self.padded()
        for pos in self.positions():
            yield order[pos], sample_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class Seeded(Dataset):
    """Wraps a dataset: ``ds[(position, seed)]`` seeds torch, random and numpy, then returns
    ``(image, mask, index, problems)``. Global random states are restored afterwards (so the main process's
    own streams, e.g. for dropout, are untouched when there are no workers).

    ``indices`` (default: all) are the dataset items that positions refer to, so a run can leave samples
    out without touching the dataset. ``problems`` holds the messages of bad samples the dataset replaced
    to fill this slot (its ``fetch``, with ``skip_bad``); they travel with the batch to the main process.
    """

    def __init__(self, dataset, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def _fetch(self, index: int):
        fetch = getattr(self.dataset, "fetch", None)
        if fetch is None:  # any map-style dataset of (image, mask) works
            image, mask = self.dataset[index]
            return image, mask, []
        return fetch(index)

    def __getitem__(self, key):
        position, seed = key if isinstance(key, tuple) else (key, None)
        index = self.indices[position] if self.indices is not None else position
        if seed is None:
            image, mask, problems = self._fetch(index)
        else:
            py, npy = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                try:
                    image, mask, problems = self._fetch(index)
                finally:
                    random.setstate(py)
                    np.random.set_state(npy)
        return image, mask, index, tuple(problems)


def collate(batch):
    """Stack ``(image, mask, index[, problems])`` samples into ``(images, masks, indices, replaced)``, where
    ``replaced`` holds the problems of each slot that a neighbour filled; different sizes get an error that
    says what to do."""
    images, masks, indices = ([s[k] for s in batch] for k in range(3))
    if len({tuple(im.shape) for im in images}) > 1:
        sizes = sorted({tuple(im.shape[-2:]) for im in images})
        raise FcnsegError(f"images of different sizes {sizes[:4]} cannot share a batch; pass --crop-size H W "
                          f"(training) or use --batch-size 1")
    replaced = [tuple(s[3]) for s in batch if len(s) > 3 and s[3]]  # one entry per slot a neighbour filled
    return torch.stack(images), torch.stack(masks), torch.tensor(indices), replaced


class _Checks(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        return self.dataset.check(index) or ""


def _as_is(item):
    return item


def scan_samples(dataset, workers: int = 0) -> tuple[list[int], list[str]]:
    """Check every sample once with ``dataset.check(i)`` (the reads and checks training does), in ``workers``
    processes; return the indices of the good samples and one message per bad one. A dataset without
    ``check`` is taken as good."""
    from torch.utils.data import DataLoader

    if getattr(dataset, "check", None) is None:
        return list(range(len(dataset))), []
    # a private generator: the scan must not draw from the global RNG (the model is initialised after it)
    loader = DataLoader(_Checks(dataset), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        generator=torch.Generator())
    good, bad = [], []
    for i, problem in enumerate(loader):
        if problem:
            bad.append(problem)
        else:
            good.append(i)
    return good, bad


def make_loader(dataset: Seeded, sampler, batch_size: int, workers: int, device: torch.device, drop_last: bool = False):
    from torch.utils.data import DataLoader

    # a private generator: creating an iterator must not draw from the global RNG (dropout and loss
    # sampling use it, and a resumed run restores it mid-epoch); augmentation has its own per-sample seeds
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator())
