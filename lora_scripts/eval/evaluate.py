"""Score a text model on a user's records, the way training renders them.

When every record's answer is a JSON object, the model answers each prompt greedily and the
answers are scored field by field (`json_fields.py`). Otherwise the score is the mean
cross-entropy per target token (the tokens training learns: the response, plus EOS where
training appends one) and its perplexity, exp(mean loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.data.text_files import Row, read_rows
from lora_scripts.data.text_samples import TextSample, build_samples, make_collate
from lora_scripts.errors import UserError
from lora_scripts.eval.json_fields import JsonScore, score_json_outputs
from lora_scripts.tasks.text_batches import causal_lm_loss, count_target_tokens
from lora_scripts.tasks.text_data import make_sample_builder
from lora_scripts.tasks.text_infer import generate_texts

GENERATE_BATCH = 32  # answers are short; on a CPU a wider batch spends fewer passes over the weights
LOSS_BATCH = 8
MIN_NEW_TOKENS = 32


@dataclass(frozen=True)
class LossScore:
    """Mean cross-entropy per target token over `tokens` target tokens of `n` records."""

    n: int
    tokens: int
    loss: float
    perplexity: float


@dataclass
class EvalSet:
    """Records ready to score: prompts and JSON references, or tokenized samples for the loss."""

    path: Path
    prompts: list[str]
    references: list[dict] | None  # one JSON object per record, or None: score the loss
    samples: list[TextSample]  # for the loss
    add_special_tokens: bool
    max_new_tokens: int
    pad_token_id: int

    @property
    def kind(self) -> str:
        """"json" (field scores) or "text" (loss and perplexity)."""
        return "json" if self.references is not None else "text"


def reference_object(response: str) -> dict | None:
    """The answer as a JSON object when it is one (text after it, e.g. an end-of-turn marker, is
    allowed; text before it is not), else None."""
    text = response.lstrip()
    if not text.startswith("{"):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _answers(row: Row) -> int:
    """How many answers a row holds (chat rows may hold several assistant turns)."""
    messages = row.get("messages")
    if isinstance(messages, list):
        return sum(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    return 1


def load_eval_set(cfg: TrainConfig, tokenizer, data_file: Path, max_new_tokens: int | None = None) -> EvalSet:
    """Read `data_file` (any layout training reads) and render it as `cfg` renders training rows.

    JSON scoring needs one JSON-object answer per record; `max_new_tokens` defaults to twice the
    longest reference answer in tokens (at least 32). Raises UserError for a missing or bad file.
    """
    if not data_file.is_file():
        raise UserError(f"--data {data_file}: file not found; pass a CSV/JSON/JSONL file of records in your training layout")
    rows = read_rows(data_file)
    builder = make_sample_builder(cfg, tokenizer, rows)
    rendered = [builder.render(row, source) for row, source in rows]
    references = [reference_object(response) for _, response in rendered]
    is_json = all(ref is not None for ref in references) and all(_answers(row) == 1 for row, _ in rows)
    samples, _ = build_samples(rows, builder)
    longest = max(len(tokenizer(response, add_special_tokens=False)["input_ids"]) for _, response in rendered)
    return EvalSet(
        path=data_file,
        prompts=[prompt for prompt, _ in rendered],
        references=[ref for ref in references if ref is not None] if is_json else None,
        samples=samples,
        add_special_tokens=not builder.is_chat,
        max_new_tokens=max_new_tokens or max(MIN_NEW_TOKENS, 2 * longest),
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def score_loss(model, eval_set: EvalSet) -> LossScore:
    """Mean cross-entropy per target token, summed over batches then divided (not a mean of means)."""
    collate = make_collate(eval_set.pad_token_id)
    total, tokens = 0.0, 0
    for start in range(0, len(eval_set.samples), LOSS_BATCH):
        batch = collate(eval_set.samples[start : start + LOSS_BATCH])
        total += float(causal_lm_loss(model, batch))
        tokens += count_target_tokens(batch)
    loss = total / tokens
    return LossScore(n=len(eval_set.samples), tokens=tokens, loss=loss, perplexity=math.exp(loss))


def score(model, tokenizer, eval_set: EvalSet) -> tuple[JsonScore | LossScore, list[str]]:
    """Score `model` on the set; returns the score and the generated answers (none for text)."""
    model.eval()
    if eval_set.references is None:
        return score_loss(model, eval_set), []
    outputs = generate_texts(model, tokenizer, eval_set.prompts, eval_set.max_new_tokens,
                             add_special_tokens=eval_set.add_special_tokens, batch_size=GENERATE_BATCH)
    return score_json_outputs(outputs, eval_set.references), outputs


def format_loss_table(before: LossScore, after: LossScore) -> str:
    """Loss and perplexity before and after, with the change."""
    lines = [f"{'metric':<12}  {'before':>9}  {'after':>9}  {'change':>9}",
             f"{'records':<12}  {before.n:>9}  {after.n:>9}",
             f"{'tokens':<12}  {before.tokens:>9}  {after.tokens:>9}"]
    for name in ("loss", "perplexity"):
        b, a = getattr(before, name), getattr(after, name)
        lines.append(f"{name:<12}  {b:>9.4f}  {a:>9.4f}  {a - b:>+9.4f}")
    return "\n".join(lines)
