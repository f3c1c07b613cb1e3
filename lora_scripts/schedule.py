"""Which samples each optimizer step uses, derived from (seed, epoch) alone so a resume can
recompute it: no data-loader state needs saving."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Batcher = Callable[[int], list[list[int]]]  # epoch -> micro-batches of sample indices


def shuffled_batches(n_items: int, batch_size: int, seed: int) -> Batcher:
    """A seeded permutation per epoch, cut into micro-batches (the last one may be short)."""

    def batches(epoch: int) -> list[list[int]]:
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]

    return batches


@dataclass(frozen=True)
class StepPlan:
    """Groups of `accumulation` consecutive micro-batches, one group per optimizer step.

    The batcher must return the same number of micro-batches every epoch.
    """

    batcher: Batcher
    accumulation: int
    epochs: int
    max_steps: int | None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = self.batcher(epoch)
        return self._cache[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._epoch(0)) / self.accumulation)

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """Sample indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[index * self.accumulation : (index + 1) * self.accumulation]
