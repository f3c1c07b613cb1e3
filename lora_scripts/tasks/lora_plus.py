"""LoRA+ optimizer groups (Hayou et al. 2024, arXiv:2402.12354): the B (up) matrices learn
`ratio` times faster than A. Grouped as PEFT's `create_loraplus_optimizer` and kohya's
`loraplus_lr_ratio` do: every `lora_B` weight at lr x ratio, everything else (lora_A, DoRA
magnitudes) at lr."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def lora_param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, ratio: float | None) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters in `named`: one at `lr`, plus B at lr x ratio."""
    trainable = [(name, param) for name, param in named if param.requires_grad]
    if not ratio:
        return [{"params": [param for _, param in trainable], "lr": lr}]
    up = [param for name, param in trainable if ".lora_B." in name]
    rest = [param for name, param in trainable if ".lora_B." not in name]
    return [group for group in ({"params": rest, "lr": lr}, {"params": up, "lr": lr * ratio}) if group["params"]]
