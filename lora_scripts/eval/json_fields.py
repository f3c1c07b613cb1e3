"""Score JSON-extraction outputs: share parseable as a JSON object, per-field and whole-record accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class JsonScore:
    """Scores of `n` predictions; every rate is a share in [0, 1]."""

    n: int
    parse_rate: float
    field_accuracy: dict[str, float]
    exact_match: float


def extract_json_object(text: str) -> dict | None:
    """Parse a model's answer: the JSON object starting at its first `{`; None if it does not parse.

    Surrounding prose, whitespace and Markdown code fences are skipped: `raw_decode` reads one
    value from the first brace and ignores what follows. A truncated object (generation cut
    off) or single-quoted pseudo-JSON gives None.
    """
    start = text.find("{")
    if start < 0:
        return None
    try:
        parsed, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return parsed


def field_matches(prediction: dict, field: str, expected: object) -> bool:
    """Whether `prediction[field]` equals `expected` as JSON text with sorted keys.

    So 3 matches 3, but "3" does not match 3, nor 3.0, nor True 1.
    """
    if field not in prediction:
        return False
    return json.dumps(prediction[field], sort_keys=True) == json.dumps(expected, sort_keys=True)


def score_json_outputs(predictions: list[str], references: list[dict]) -> JsonScore:
    """Score raw model outputs against reference objects.

    A field's accuracy is taken over the references that have that field; a missing field or
    an unparseable output counts as wrong. Exact match needs every reference field right
    (extra predicted keys are ignored). Raises ValueError if the lists are empty or differ in length.
    """
    if not references or len(predictions) != len(references):
        raise ValueError(f"need one prediction per reference, got {len(predictions)} for {len(references)}")
    parsed = [extract_json_object(text) for text in predictions]
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    exact = 0
    for prediction, reference in zip(parsed, references):
        all_right = True
        for field, expected in reference.items():
            ok = prediction is not None and field_matches(prediction, field, expected)
            total[field] = total.get(field, 0) + 1
            right[field] = right.get(field, 0) + ok
            all_right = all_right and ok
        exact += all_right
    n = len(references)
    return JsonScore(
        n=n,
        parse_rate=sum(p is not None for p in parsed) / n,
        field_accuracy={field: right[field] / total[field] for field in total},
        exact_match=exact / n,
    )


def format_table(before: JsonScore, after: JsonScore) -> str:
    """A plain-text table, one row per metric: before, after and the change in points."""
    rows = [("parse rate", before.parse_rate, after.parse_rate),
            ("exact match", before.exact_match, after.exact_match)]
    fields = list(dict.fromkeys([*before.field_accuracy, *after.field_accuracy]))
    rows += [(f"field: {field}", before.field_accuracy.get(field, 0.0), after.field_accuracy.get(field, 0.0))
             for field in fields]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric':<{width}}  {'before':>7}  {'after':>7}  {'change':>8}",
             f"{'samples':<{width}}  {before.n:>7}  {after.n:>7}"]
    lines += [f"{name:<{width}}  {b:>7.1%}  {a:>7.1%}  {(a - b) * 100:>+7.1f}pt" for name, b, a in rows]
    return "\n".join(lines)
