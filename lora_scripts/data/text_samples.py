"""Turn text rows into token ids and loss labels.

Layouts: `prompt_template` (the spec's "问：{question}\\n答：{answer}": text up to the last field is
the prompt, the last field is the response), alpaca (instruction/input/output), chat `messages`
(rendered with the model's chat template), `prompt`/`completion`, and plain `text`.
Prompt tokens get label -100 unless `train_on_inputs`; EOS is appended so the model learns to stop.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lora_scripts.data.text_files import Row
from lora_scripts.errors import UserError

IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class TextSample:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class TokenizeStats:
    """What happened to the rows on their way to samples."""

    rows: int = 0
    lengths: list[int] = field(default_factory=list)  # uncut token length of every row, in order
    truncated: list[str] = field(default_factory=list)
    dropped_no_target: list[str] = field(default_factory=list)

    def summary(self, max_seq_length: int) -> str:
        parts = [f"{self.rows} rows"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} cut to max_seq_length={max_seq_length} (first: {self.truncated[0]})")
        if self.dropped_no_target:
            parts.append(f"{len(self.dropped_no_target)} dropped: nothing left to learn after the cut")
        return ", ".join(parts)


def detect_format(rows: list[tuple[Row, str]], data_format: str, prompt_template: str | None) -> str:
    """The layout to use: the configured one, or one chosen from the first row's columns."""
    if data_format != "auto":
        if data_format == "template" and not prompt_template:
            raise UserError("data_format: template needs a prompt_template, e.g. \"问：{question}\\n答：{answer}\"")
        return data_format
    if prompt_template:
        return "template"
    columns = set(rows[0][0])
    for name, needed in (("messages", {"messages"}), ("alpaca", {"instruction", "output"}),
                         ("prompt_completion", {"prompt", "completion"}), ("text", {"text"})):
        if needed <= columns:
            return name
    raise UserError(
        f"{rows[0][1]}: cannot tell the data layout from columns {sorted(columns)}; set prompt_template "
        "(e.g. prompt_template: \"问：{question}\\n答：{answer}\") or use columns messages / "
        "instruction+input+output / prompt+completion / text"
    )


REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                    "text": ("text",), "messages": ("messages",)}


def validate_rows(rows: list[tuple[Row, str]], data_format: str, prompt_template: str | None) -> None:
    """Check every row has what its layout needs, before any model is loaded."""
    for row, source in rows:
        if data_format == "template":
            _split_template(prompt_template or "", row, source)
        else:
            for key in REQUIRED_COLUMNS[data_format]:
                _require(row, key, source)


def template_fields(template: str) -> list[str]:
    """Field names of a prompt template in order of appearance."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"prompt_template {template!r}: {exc}; write fields as {{name}} and literal braces as {{{{ }}}}") from None


def _split_template(template: str, row: Row, source: str) -> tuple[str, str]:
    names = template_fields(template)
    if not names:
        raise UserError(f"prompt_template {template!r} has no {{field}}; the last field is the response")
    missing = [n for n in names if n not in row]
    if missing:
        raise UserError(f"{source}: prompt_template field(s) {missing} not in the row's columns {sorted(row)}")
    last = names[-1]
    marker = "{" + last + "}"
    cut = template.rindex(marker)
    values = {k: "" if v is None else str(v) for k, v in row.items()}
    prompt = template[:cut].format(**values)
    response = values[last] + template[cut + len(marker):].format(**values)
    return prompt, response


class SampleBuilder:
    """Tokenizes rows of one layout with one tokenizer."""

    def __init__(self, tokenizer: Any, data_format: str, prompt_template: str | None,
                 max_seq_length: int, train_on_inputs: bool) -> None:
        self.tokenizer = tokenizer
        self.data_format = data_format
        self.prompt_template = prompt_template
        self.max_seq_length = max_seq_length
        self.train_on_inputs = train_on_inputs
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @property
    def is_chat(self) -> bool:
        """Whether rows are rendered by the chat template (which adds its own special tokens)."""
        return self.data_format == "messages" or (self.data_format == "alpaca" and self.has_chat_template)

    # -- rendering ---------------------------------------------------------------------
    def prompt_text(self, user_text: str) -> str:
        """Render a bare prompt for generation the way training prompts were rendered."""
        if self.data_format == "template":
            names = template_fields(self.prompt_template or "")
            return _split_template(self.prompt_template or "", {n: user_text for n in names}, "--prompt")[0]
        if self.data_format in ("messages", "alpaca") and self.has_chat_template:
            return self._render_chat([{"role": "user", "content": user_text}], add_generation_prompt=True)
        if self.data_format == "alpaca":
            return ALPACA_PROMPT.format(instruction=user_text, input_block="")
        return user_text

    def _render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _segments(self, row: Row, source: str) -> list[tuple[str, bool]]:
        """The row as (text, is_target) pieces in order."""
        fmt = self.data_format
        if fmt == "template":
            prompt, response = _split_template(self.prompt_template or "", row, source)
            return [(prompt, False), (response, True)]
        if fmt == "text":
            return [(str(_require(row, "text", source)), True)]
        if fmt == "prompt_completion":
            return [(str(_require(row, "prompt", source)), False), (str(_require(row, "completion", source)), True)]
        if fmt == "alpaca":
            instruction = str(_require(row, "instruction", source))
            extra = str(row.get("input") or "")
            output = str(_require(row, "output", source))
            if self.has_chat_template:
                user = instruction + ("\n\n" + extra if extra else "")
                return self._chat_segments([{"role": "user", "content": user}, {"role": "assistant", "content": output}], source)
            block = f"### Input:\n{extra}\n\n" if extra else ""
            return [(ALPACA_PROMPT.format(instruction=instruction, input_block=block), False), (output, True)]
        return self._chat_segments(_require(row, "messages", source), source)

    def _chat_segments(self, messages: Any, source: str) -> list[tuple[str, bool]]:
        if not self.has_chat_template:
            raise UserError(f"{source}: chat `messages` need a tokenizer with a chat template; this base model has none (use prompt_template instead)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UserError(f"{source}: `messages` must be a list of {{\"role\": ..., \"content\": ...}} objects")
        segments: list[tuple[str, bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render_chat(messages[:index], add_generation_prompt=True)
            full = self._render_chat(messages[: index + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise UserError(f"{source}: the model's chat template does not render turns as prefixes of each other; use prompt_template instead")
            segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        if not segments:
            raise UserError(f"{source}: `messages` has no assistant turn to learn")
        return segments

    # -- tokenizing --------------------------------------------------------------------
    def render(self, row: Row, source: str) -> tuple[str, str]:
        """The row's prompt text and response text, as the model sees them."""
        segments = self._segments(row, source)
        return "".join(t for t, target in segments if not target), "".join(t for t, target in segments if target)

    def build(self, row: Row, source: str) -> tuple[TextSample, int]:
        """Tokenize one row; returns the sample (cut to max_seq_length) and its uncut length."""
        input_ids: list[int] = []
        labels: list[int] = []
        chat = self.is_chat
        for index, (text, is_target) in enumerate(self._segments(row, source)):
            add_special = index == 0 and not chat
            ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
            input_ids += ids
            labels += ids if (is_target or self.train_on_inputs) else [IGNORE_INDEX] * len(ids)
        eos = self.tokenizer.eos_token_id
        if not chat and eos is not None:
            input_ids.append(eos)
            labels.append(eos)
        sample = TextSample(input_ids[: self.max_seq_length], labels[: self.max_seq_length], source)
        return sample, len(input_ids)


def _require(row: Row, key: str, source: str) -> Any:
    if key not in row or row[key] is None or row[key] == "":
        raise UserError(f"{source}: missing or empty `{key}` (columns: {sorted(row)})")
    return row[key]


def build_samples(rows: list[tuple[Row, str]], builder: SampleBuilder) -> tuple[list[TextSample], TokenizeStats]:
    """Tokenize every row, counting cut rows and dropping rows left with no target token."""
    stats = TokenizeStats(rows=len(rows))
    samples = []
    for row, source in rows:
        sample, length = builder.build(row, source)
        stats.lengths.append(length)
        if length > builder.max_seq_length:
            stats.truncated.append(source)
        if all(label == IGNORE_INDEX for label in sample.labels):
            stats.dropped_no_target.append(source)
            continue
        samples.append(sample)
    if not samples:
        raise UserError(f"no trainable samples: all {len(rows)} rows lost their response to max_seq_length={builder.max_seq_length}; raise max_seq_length")
    return samples, stats


def split_validation(items: list, share: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out `share` of the items (at least one when share > 0)."""
    if share <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * share))
    if n_val >= len(items):
        raise UserError(f"validation_split={share} leaves no training data ({len(items)} samples); lower it")
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def make_collate(pad_token_id: int) -> Callable[[list[TextSample]], dict[str, torch.Tensor]]:
    """Right-pad a list of samples into input_ids / attention_mask / labels tensors."""

    def collate(samples: list[TextSample]) -> dict[str, torch.Tensor]:
        width = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[i, :n] = torch.tensor(s.input_ids)
            labels[i, :n] = torch.tensor(s.labels)
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return collate
