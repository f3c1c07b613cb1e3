"""`check_text_samples`: checks on LLM fine-tuning data (prompt/response pairs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from lora_scripts.datacheck.report import Finding, Report, noted_finding


class PromptResponse(NamedTuple):
    """One text sample as the doctor sees it; `source` is e.g. "train.jsonl:12"."""

    prompt: str
    response: str
    source: str


def check_text_samples(
    samples: Sequence[PromptResponse | tuple[str, str, str]],
    token_lengths: Sequence[int] | None = None,
    max_seq_length: int | None = None,
    template_fields: Sequence[str] = (),
    raw_rows: Sequence[tuple[str, Mapping[str, object]]] = (),
    validation_samples: Sequence[PromptResponse | tuple[str, str, str]] = (),
) -> Report:
    """Check LLM samples: exact duplicates, empty responses, samples cut by `max_seq_length`
    (needs `token_lengths`, one per sample: prompt + response tokens), rows lacking a template
    field (`raw_rows` as (source, row dict) pairs, checked against `template_fields`), and
    validation prompts that also occur in training (`validation_samples`).

    Raises ValueError if `token_lengths` is given without `max_seq_length` or with another length
    than `samples`.
    """
    train = [PromptResponse(*sample) for sample in samples]
    validation = [PromptResponse(*sample) for sample in validation_samples]
    if token_lengths is not None and (max_seq_length is None or len(token_lengths) != len(train)):
        raise ValueError("token_lengths needs max_seq_length and one length per sample")
    checks = [
        _duplicates(train),
        _empty_responses(train),
        _truncated(train, token_lengths, max_seq_length) if token_lengths is not None else None,
        _missing_fields(template_fields, raw_rows) if template_fields else None,
        _overlap(train, validation),
    ]
    stats: dict[str, object] = {"samples": len(train), "validation_samples": len(validation)}
    if token_lengths:
        stats |= {"max_tokens": max(token_lengths), "mean_tokens": round(sum(token_lengths) / len(token_lengths), 1)}
    return Report([finding for finding in checks if finding is not None], stats)


def _key(text: str) -> str:
    return " ".join(text.split())


def _duplicates(samples: list[PromptResponse]) -> Finding | None:
    first_source: dict[tuple[str, str], str] = {}
    notes = {}
    for sample in samples:
        original = first_source.setdefault((_key(sample.prompt), _key(sample.response)), sample.source)
        if original != sample.source:
            notes[sample.source] = f"same prompt and response as {original}"
    return noted_finding("duplicate_sample", "warning", "repeated samples are learned by heart; remove the copies", notes)


def _empty_responses(samples: list[PromptResponse]) -> Finding | None:
    items = [sample.source for sample in samples if not sample.response.strip()]
    if not items:
        return None
    return Finding("empty_response", "warning",
                   "samples with an empty response teach the model to answer nothing; fill them in or remove them", items)


def _truncated(samples: list[PromptResponse], token_lengths: Sequence[int], max_seq_length: int | None) -> Finding | None:
    assert max_seq_length is not None
    notes = {
        sample.source: f"{length} tokens, the last {length - max_seq_length} are cut"
        for sample, length in zip(samples, token_lengths) if length > max_seq_length
    }
    return noted_finding(
        "truncated_sample", "warning",
        f"longer than max_seq_length={max_seq_length}: the end of the answer is never trained; raise "
        "max_seq_length or shorten these samples", notes)


def _missing_fields(fields: Sequence[str], rows: Sequence[tuple[str, Mapping[str, object]]]) -> Finding | None:
    notes = {}
    for source, row in rows:
        absent = [name for name in fields if name not in row]
        blank = [name for name in fields if name in row and not str(row[name] or "").strip()]
        parts = ([f"missing {', '.join(absent)}"] if absent else []) + ([f"empty {', '.join(blank)}"] if blank else [])
        if parts:
            notes[source] = "; ".join(parts)
    return noted_finding(
        "missing_template_field", "error",
        f"rows lacking a field of the prompt template ({', '.join('{' + name + '}' for name in fields)}); "
        "training cannot format them: fill them in or remove the rows", notes, blocking=True)


def _overlap(train: list[PromptResponse], validation: list[PromptResponse]) -> Finding | None:
    train_source = {}
    for sample in train:
        train_source.setdefault(_key(sample.prompt), sample.source)
    notes = {sample.source: f"same prompt as {train_source[_key(sample.prompt)]}"
             for sample in validation if _key(sample.prompt) in train_source}
    return noted_finding(
        "train_val_overlap", "warning",
        "validation prompts that also occur in training make validation loss look better than it is; "
        "remove them from one of the two sets", notes)
