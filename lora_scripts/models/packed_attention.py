"""Attention for packed rows that computes each sample's own causal block and nothing else.

Given a packed row (per-sample position ids, no attention mask), transformers' SDPA path builds a
block-diagonal causal mask over the whole row and scores every query against every key: L² work
per row, most of it masked away, and a masked kernel instead of the fused causal one. This
implementation runs SDPA once per sample with `is_causal=True` and no mask, using the sample
boundaries the packed collate passes as `cu_seq_lens_q` (the keyword transformers' own
flash-attention packing uses, which it forwards from the model's call down to every attention
layer), so a row costs Σ Lᵢ². Without boundaries (generation, padded batches, batches of several
rows) it is plain SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lora_scripts_per_sample_sdpa"
BOUNDS_KEY = "cu_seq_lens_q"  # int tensor [0, end of sample 1, end of sample 2, …, row length]
_last_bounds: list = [None, []]  # (tensor, its values): every layer of a forward gets the same tensor


def _edges(bounds: torch.Tensor) -> list[int]:
    """The boundaries as Python ints, read from the device once per forward rather than per layer."""
    if _last_bounds[0] is not bounds:
        _last_bounds[:] = [bounds, bounds.tolist()]
    return _last_bounds[1]


def per_sample_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per packed sample when the call carries sample boundaries, else plain SDPA."""
    bounds = kwargs.pop(BOUNDS_KEY, None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    edges = _edges(bounds)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                               dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
        for start, end in zip(edges, edges[1:])
    ]
    return torch.cat(outputs, dim=1), None  # SDPA's output is (batch, tokens, heads, head_dim)


def use_per_sample_attention(model: PreTrainedModel) -> bool:
    """Switch a model that attends with SDPA to the per-sample version (same results, less work on
    packed rows); False, and nothing changed, for a model using another implementation."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, per_sample_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches still get SDPA's masks
    model.set_attn_implementation(NAME)
    return True
