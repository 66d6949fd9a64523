"""Samplers that make training reproducible, resumable and shardable across ranks.

:class:`EpochSampler` is a ``DistributedSampler`` that yields ``(index, seed)`` pairs:
the order and the per-item augmentation seed are functions of ``(seed, epoch,
position)`` only, never of worker processes or the global RNG, so a run resumed
mid-epoch (``set_epoch(epoch, start=...)``) sees exactly the items and augmentations
the uninterrupted run would have seen. :class:`ShardSampler` splits an evaluation set
across ranks without the padding ``DistributedSampler`` adds, so every item is counted
exactly once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


class EpochSampler(DistributedSampler):
    """Shuffled, rank-sharded ``(index, seed)`` pairs; resumable at any position.

    Like ``DistributedSampler`` (``drop_last=True`` so every rank does the same number
    of steps), plus ``set_epoch(epoch, start=k)``: skip the first ``k`` items of this
    rank's share of the epoch. The per-item seed depends on ``(seed, epoch, global
    position)``, so each epoch draws new augmentations (and new synthetic clips).
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if len(dataset) < num_replicas:
            raise ValueError(f"{len(dataset)} items cannot be split over {num_replicas} ranks")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is outside this rank's {self.num_samples} items")
        self.start = int(start)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order = order[: self.total_size]
        seeds = np.random.default_rng((self.seed, self.epoch)).integers(0, 2**62, size=self.total_size)
        for pos in range(self.rank + self.start * self.num_replicas, self.total_size, self.num_replicas):
            yield order[pos], int(seeds[pos])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order: a partition, nothing padded or repeated."""

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0):
        self.length = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def split_key(key) -> Tuple[int, Optional[int]]:
    """A dataset key ``i`` or ``(i, seed)`` -> ``(i, seed)`` (``seed`` None for a plain index)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None
