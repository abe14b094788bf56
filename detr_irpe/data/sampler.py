"""Sampling that makes training exactly resumable.

The order of an epoch is a pure function of ``(seed, epoch)`` and every sample's augmentation
is seeded from ``(seed, epoch, position)``. So a run stopped at any iteration and resumed from
its checkpoint sees the same batches, augmented the same way, whatever the number of workers.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    """Shuffled (or sequential) indices, sharded across ``world_size`` ranks, startable mid-epoch.

    Yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`. Like ``DistributedSampler``
    the index list is padded by wrapping around so that every rank gets the same count.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            order = torch.cat([order, order[: total - self.num_samples]])
        return order[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self._order().tolist()
        for position in range(self.start, len(order)):
            sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + position * self.world_size + self.rank)
            yield order[position], sample_seed % (2**63 - 1)

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededDataset(Dataset):
    """Wraps a dataset so ``ds[(index, seed)]`` runs its random transforms under ``seed``.

    The global RNG state of the calling process is left untouched (so data loading in the main
    process does not shift the model's dropout RNG). A plain integer index works as usual.
    ``tracker`` (a :class:`~detr_irpe.data.loader.WorkerItems`) is told which index a DataLoader
    worker is loading, so that a worker killed mid-item can be reported with it.
    """

    def __init__(self, dataset: Dataset, tracker=None):
        self.dataset = dataset
        self.tracker = tracker

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name in ("dataset", "tracker"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def describe_item(self, index) -> str:
        describe = getattr(self.dataset, "describe_item", None)
        return describe(index) if describe is not None else f"item {index}"

    def __getitem__(self, item):
        if self.tracker is None:
            return self._load(item)
        self.tracker.begin(item[0] if isinstance(item, tuple) else item)
        try:
            return self._load(item)
        finally:
            self.tracker.end()

    def _load(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2**32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
