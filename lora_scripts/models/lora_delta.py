"""LoRA layers computed as one product with the merged weight (the `fused_lora` setting).

PEFT computes a LoRA layer as `base(x) + B(A(x)) * scale`: the base product, two thin products
on x, a scale and an add over the output, and their mirror images in the backward pass. With a
frozen float32 base the same output is `x @ (W + scale * B @ A)ᵀ`: one product with a merged
weight that costs out·in·rank to build (again in the backward pass instead of keeping it), which
the thin products on x outweigh once a batch has more rows than 2·in·out / (2·in + out). The
gradients of A and B need the thin products `x @ Aᵀ` and `grad @ B` only, computed in the backward
pass. Same results as PEFT's forward up to float32 rounding (`tests/test_lora_delta.py`).

Installed per layer (`fuse_lora_layers`); each call falls back to PEFT's own forward whenever
the shortcut would not be the same computation or would not pay: no gradients (evaluation,
generation), adapters disabled or merged, several or variant adapters (DoRA), dropout, autocast,
a non-float32 tensor, a base weight that trains, an unbatched image, or too few rows. The
rebinding is per module instance: state dicts and saving are unchanged; pickling a whole fused
module is not supported.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


class _LinearDelta(torch.autograd.Function):
    """y = x @ (W + s·B·A)ᵀ + bias, with gradients for x, A and B only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale = scale
        return F.linear(x, _merged_weight(weight, lora_a, lora_b, scale), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        grad_rows, x_rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ _merged_weight(weight, lora_a, lora_b, ctx.scale)).view(x.shape)
        grad_b = (grad_rows.t() @ (x_rows @ lora_a.t())).mul_(ctx.scale)
        grad_a = ((grad_rows @ lora_b).t() @ x_rows).mul_(ctx.scale)
        return grad_x, None, None, grad_a, grad_b, None


class _ConvDelta(torch.autograd.Function):
    """y = conv2d(x, W + s·B·A) + bias for PEFT's conv LoRA (A: the base's kernel, B: 1x1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale, ctx.stride, ctx.padding = scale, stride, padding
        return F.conv2d(x, _merged_weight(weight, lora_a, lora_b, scale), bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        stride, padding, rank = ctx.stride, ctx.padding, lora_a.shape[0]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(x.shape, _merged_weight(weight, lora_a, lora_b, ctx.scale), grad, stride, padding)
        grad_through_b = F.conv2d(grad, lora_b.reshape(-1, rank).t()[:, :, None, None])
        grad_b = conv2d_weight(F.conv2d(x, lora_a, None, stride, padding), lora_b.shape, grad).mul_(ctx.scale)
        grad_a = conv2d_weight(x, lora_a.shape, grad_through_b, stride, padding).mul_(ctx.scale)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·B·A in W's shape (for a convolution: B's 1x1 kernel times A's kernel)."""
    rank = lora_a.shape[0]
    merged = torch.addmm(weight.reshape(weight.shape[0], -1), lora_b.reshape(-1, rank), lora_a.reshape(rank, -1), alpha=scale)
    return merged.view_as(weight)


def _eligible(module: nn.Module) -> bool:
    """A PEFT LoRA layer whose every adapter could run as a merged product."""
    if type(module) is peft_lora.Linear:
        return type(module.base_layer) is nn.Linear
    if type(module) is peft_lora.Conv2d and type(module.base_layer) is nn.Conv2d:
        base = module.base_layer
        return base.groups == 1 and base.dilation == (1, 1) and base.padding_mode == "zeros" and not isinstance(base.padding, str)
    return False


def _adapter(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one adapter to compute merged on this call, or None for PEFT's own forward."""
    if args or kwargs or layer.disable_adapters or layer.merged or not torch.is_grad_enabled():
        return None
    if len(layer.active_adapters) != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad) or lora_b.bias is not None:
        return None
    if any(t.dtype != torch.float32 for t in (x, base.weight, lora_a.weight, lora_b.weight)):
        return None
    if isinstance(base, nn.Conv2d):
        same_window = (lora_a.kernel_size, lora_a.stride, lora_a.padding) == (base.kernel_size, base.stride, base.padding)
        if x.dim() != 4 or not same_window:
            return None
    fan_in, fan_out = base.weight[0].numel(), base.weight.shape[0]
    rows = x.numel() // x.shape[-1 if isinstance(base, nn.Linear) else 1]
    if isinstance(base, nn.Conv2d):
        rows //= base.stride[0] * base.stride[1]
    return name if rows * (2 * fan_in + fan_out) > 2 * fan_in * fan_out else None


def _forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward installed on a fused layer: merged when `_adapter` allows, else PEFT's."""
    name = _adapter(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base, scale = layer.base_layer, layer.scaling[name]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if isinstance(base, nn.Linear):
        return _LinearDelta.apply(x, base.weight, base.bias, lora_a, lora_b, scale)
    return _ConvDelta.apply(x, base.weight, base.bias, lora_a, lora_b, scale, base.stride, base.padding)


def fuse_lora_layers(model: nn.Module) -> int:
    """Compute `model`'s plain LoRA layers (PEFT Linear and Conv2d) as merged products while
    training; returns how many layers can. Weights, state dict and saving are unchanged."""
    layers = [module for module in model.modules() if _eligible(module)]
    for module in layers:
        module.forward = MethodType(_forward, module)
    return len(layers)
