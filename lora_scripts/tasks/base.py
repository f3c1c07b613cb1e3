"""The task contract: what every task type (text, image) answers for the loop, the CLI, the data
check and generate, and what one built task hands the shared training loop.

A new task type is one module in `tasks/` defining `TASK = Task(...)`, listed in
`tasks/__init__.py`. Nothing outside `tasks/` asks which task type it is talking to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lora_scripts.config import TrainConfig
    from lora_scripts.datacheck import FixSummary, Report
    from lora_scripts.tracking import Tracker

Batch = dict[str, torch.Tensor]
# The first sentence of every task's advice when a loss or gradient is not finite.
NAN_ADVICE = "usually the learning rate is too high (try half), or fp16 overflowed (use bf16 or mixed_precision: no)"


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
class TaskRun:
    """A model with LoRA attached, its data, and the few task-specific functions the loop calls.

    `loss(model, batch)` returns the sum of per-unit losses and `count_units(batch)` the number
    of units in it (target tokens for text, images for image), so the loop can normalise over a
    whole gradient-accumulation group exactly as one big batch would. `count_processed` counts
    what the throughput figure reports (all tokens, or images). `save_adapter(folder, name,
    progress)` is the only place the task writes its LoRA; `after_step(progress, tracker)` runs on
    the main process after every optimizer step (image samples).
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
    nan_advice: str = NAN_ADVICE
    param_groups: list[dict[str, Any]] | None = None  # optimizer groups with their own "lr"; default: one at learning_rate
    after_step: Callable[[Progress, Tracker], None] | None = None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA parameters by name (what a resume must restore exactly)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class GenerateRequest:
    """What `lora-scripts generate` asks of a task; each task reads the fields it uses."""

    prompts: list[str]
    adapter: Path  # a LoRA file or folder, default output_dir
    lora_scale: float = 1.0
    max_new_tokens: int = 128  # text
    steps: int | None = None  # image: sampler steps (None: the config's sample_steps)
    seed: int | None = None  # image: seed of the first prompt (None: the config's seed)
    out_dir: Path | None = None  # image: where PNGs go (None: output_dir/generated)


@dataclass
class DataReport:
    """A data check's findings, and how to apply the safe fixes when the task has any."""

    report: Report
    fix: Callable[[int], FixSummary] | None = None  # fix(max_side)


@dataclass(frozen=True)
class Task:
    """One task type. Every function takes the validated config.

    - `preflight(cfg)`: cheap checks of the inputs before any weights load (raises UserError).
    - `build(cfg, device)`: load model and data, attach LoRA; the `TaskRun` the loop trains.
    - `data_report(cfg, embeddings_file)`: the dataset doctor's findings (`check-data`).
    - `generate(cfg, request)`: run the base model plus a trained LoRA; the lines to print.
    - `exports[format](cfg)`: write the finished LoRA in `output_dir` in another format (the
      config's `export:` list names them); the lines to print.
    """

    name: str
    preflight: Callable[[TrainConfig], None]
    build: Callable[[TrainConfig, str], TaskRun]
    data_report: Callable[[TrainConfig, Path | None], DataReport]
    generate: Callable[[TrainConfig, GenerateRequest], list[str]]
    exports: dict[str, Callable[[TrainConfig], list[str]]] = field(default_factory=dict)
