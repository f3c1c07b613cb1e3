"""Which samples each optimizer step uses, derived from (seed, epoch) alone so a resume can
recompute it: no data-loader state needs saving.

With several processes a micro-batch is global (`batch_size` per process) and each process takes
every world-th sample of it (`process_share`), so the data order is that of one process with the
whole batch. Each sample's random draws come from its own seed (`sample_seeds`), so they do not
depend on which process draws them either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Batcher = Callable[[int], list[list[int]]]  # epoch -> micro-batches of sample indices


def global_batch_size(batch_size: int) -> int:
    """Samples per micro-batch over every process of the job (`batch_size` is per process)."""
    import torch.distributed as dist

    return batch_size * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


def sample_seeds(seed: int, step: int, micro_batches: list[list[int]]) -> list[list[int]]:
    """A seed for each sample of optimizer step `step` (1-based), by its place in the step's
    micro-batches: from (seed, step) alone, so the same on every process and on resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flat = iter(torch.randint(2**62, (sum(len(indices) for indices in micro_batches),), generator=generator).tolist())
    return [[next(flat) for _ in indices] for indices in micro_batches]


@dataclass(frozen=True)
class Share:
    """One forward/backward of a process: samples, their seeds, and the loss weight (0 for a
    stand-in that only joins the collectives)."""

    indices: list[int]
    seeds: list[int]
    weight: float = 1.0


def process_share(micro_batches: list[list[int]], seeds: list[list[int]], rank: int, world: int, split: int = 1) -> list[Share]:
    """What process `rank` of `world` runs of one step: every world-th sample of each micro-batch
    from its rank on, cut in `split` parts (auto_batch_size). A process that gets no sample of a
    short micro-batch runs its first sample at weight 0: it still joins the gradient all-reduce,
    so no process waits for it, and the result is that of one process."""
    shares = []
    for indices, group_seeds in zip(micro_batches, seeds):
        mine, my_seeds = indices[rank::world], group_seeds[rank::world]
        if not mine:
            shares.append(Share(indices[:1], group_seeds[:1], 0.0))
            continue
        size = math.ceil(len(mine) / split)
        shares += [Share(mine[i : i + size], my_seeds[i : i + size]) for i in range(0, len(mine), size)]
    return shares


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
