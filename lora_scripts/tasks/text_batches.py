"""How tokenized text samples become a batch and a loss.

Packing (the default) lays the samples of a micro-batch end to end in one row, so no compute is
spent on padding. Position ids restart at 0 for every sample and no attention mask is passed:
transformers then builds a block-diagonal causal mask from the position ids (masking_utils
`find_packed_sequence_indices`, as its `DataCollatorWithFlattening` relies on), so no token
attends across samples. With `bounds`, the row also carries the samples' boundaries, which
`models/packed_attention.py` uses to compute each sample's attention on its own (no L² mask).
The first token of each sample gets no target, exactly as in a padded row, so packed and padded
batches give the same loss and gradients.

The loss asks the model for logits only where the next token is a target (`logits_to_keep`),
which skips the LM head (vocabulary x hidden per token) on prompt tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_scripts.data.text_samples import IGNORE_INDEX, TextSample, make_collate
from lora_scripts.models.packed_attention import BOUNDS_KEY
from lora_scripts.tasks.base import Batch

PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def make_packed_collate(bounds: bool = False) -> Callable[[list[TextSample]], Batch]:
    """One row holding every sample of the micro-batch, with per-sample position ids (and, with
    `bounds`, the samples' cumulative end offsets for per-sample attention)."""

    def collate(samples: list[TextSample]) -> Batch:
        input_ids, labels, positions, ends = [], [], [], [0]
        for sample in samples:
            input_ids += sample.input_ids
            labels += [IGNORE_INDEX, *sample.labels[1:]]  # nothing predicts a sample's first token
            positions += range(len(sample.input_ids))
            ends.append(len(input_ids))
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }
        if bounds:
            batch[BOUNDS_KEY] = torch.tensor(ends, dtype=torch.int32)
        return batch

    return collate


def make_text_collate(pad_token_id: int, packing: bool, bounds: bool = False) -> Callable[[list[TextSample]], Batch]:
    """Packed rows (with sample boundaries if `bounds`), or right-padded rows with an attention mask."""
    return make_packed_collate(bounds) if packing else make_collate(pad_token_id)


def model_inputs(batch: Batch) -> Batch:
    """The entries of a batch the model's forward takes (everything but the labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can restrict its logits to given positions."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def causal_lm_loss(model: nn.Module, batch: Batch, targets_only: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens.

    With `targets_only`, logits are computed only at positions whose next token is a target in
    some row of the batch.
    """
    targets = batch["labels"][:, 1:]
    inputs = model_inputs(batch)
    if targets_only:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        logits = model(**inputs, logits_to_keep=keep).logits
        targets = targets[:, keep]
    else:
        logits = model(**inputs).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_target_tokens(batch: Batch) -> int:
    """Tokens that carry loss (labels shifted by one, as the loss sees them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_tokens(batch: Batch) -> int:
    """Non-padding tokens fed to the model (the tokens/s figure)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


@torch.no_grad()
def packing_works(model: nn.Module, samples: list[TextSample], pad_token_id: int, bounds: bool = False) -> bool:
    """Whether this model keeps packed samples apart: the packed and the padded batch of (up
    to) two samples give the same logits at every real token. Models whose attention ignores
    per-sample position ids would let samples see each other, so they train padded."""
    probe = samples[:2]
    if len(probe) < 2:
        return True
    was_training = model.training
    model.eval()
    try:
        padded = make_collate(pad_token_id)(probe)
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        packed = make_packed_collate(bounds)(probe)
        # no cache: transformers looks for packed samples only when there is none (training)
        packed_logits = model(**model_inputs(packed), use_cache=False).logits[0]
    finally:
        model.train(was_training)
    real = padded_logits[padded["attention_mask"].bool()]
    tolerance = PROBE_TOLERANCE.get(real.dtype, 1e-2) * max(1.0, float(real.abs().max()))
    return real.shape == packed_logits.shape and bool((real - packed_logits).abs().max() <= tolerance)
