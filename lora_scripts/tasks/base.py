"""What a task hands the shared training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Progress:
    """Where the loop's run stands: optimizer step reached, of how many, and steps per epoch."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        """The epoch the step falls in (1-based; 0 before the first step)."""
        return -(-self.step // self.steps_per_epoch)


@dataclass
class Task:
    """A model with LoRA attached, its data, and the few task-specific functions the loop calls.

    `loss(model, batch)` returns the sum of per-unit losses and `count_units(batch)` the number
    of units in it (target tokens for text, images for image), so the loop can normalise over a
    whole gradient-accumulation group exactly as one big batch would. `count_processed` counts
    what the throughput figure reports (all tokens, or images).
    """

    model: nn.Module
    train_set: Sequence[Any]
    eval_set: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    count_units: Callable[[Batch], int]
    count_processed: Callable[[Batch], int]
    save_adapter: Callable[[Path, str, Progress], list[Path]]
    unit_name: str
    batcher: Callable[[int], list[list[int]]] | None = None  # default: shuffled_batches
    fingerprint: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    nan_advice: str = ""
    param_groups: list[dict[str, Any]] | None = None  # optimizer groups with their own "lr"; default: one at learning_rate
    after_step: Callable[[Progress], None] | None = None  # called after every optimizer step

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA parameters by name (what a resume must restore exactly)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
