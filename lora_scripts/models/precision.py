"""The dtype frozen base weights are held in."""

from __future__ import annotations

import torch


def compute_dtype(mixed_precision: str, device: str) -> torch.dtype:
    """The mixed-precision dtype on GPU; float32 on CPU, where bf16/fp16 matmuls are far slower."""
    if device == "cpu" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
