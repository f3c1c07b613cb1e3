"""The text benchmarks' data: the demo's JSON-extraction rows, and a generated chat set whose
lengths have a long tail, both written as chat `messages` JSONL and tokenized the way
lora-scripts tokenizes them, so every row of a benchmark trains on the same tokens."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

from lora_scripts.data.text_files import read_rows
from lora_scripts.data.text_samples import IGNORE_INDEX, SampleBuilder, TextSample, build_samples

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "json_extract"
MAX_SEQ_LENGTH = 512
# A short system turn, so the shortest samples can be ~20 tokens (SmolLM2's template otherwise
# inserts a 20-token default system prompt).
SYSTEM = "Be brief."
# Long-tail lengths: log-normal around a median of 100 tokens, cut to [20, 512]. Chat SFT sets
# (e.g. Alpaca, ShareGPT) are skewed this way: most samples short, a few near the limit.
MEDIAN_TOKENS, SIGMA, SHORTEST = 100, 0.75, 20


def demo_rows(train: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """The first `train` rows of the demo's train split and the first `held_out` of its held-out split."""
    rows = [json.loads(line) for line in (DEMO_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(line) for line in (DEMO_DIR / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows[:train], held[:held_out]


def long_tail_rows(count: int, seed: int, tokenizer: Any, longest: int = MAX_SEQ_LENGTH) -> list[dict]:
    """`count` chat rows (system, user, assistant) whose token lengths follow the long tail, cut at `longest`.

    Words are single tokens of the tokenizer's own vocabulary (a space then 4+ lowercase
    letters), so a row of k words is about k tokens; sentences end every 8-16 words.
    """
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 4)
    overhead = len(tokenizer.apply_chat_template(_messages("a", "b"), tokenize=True)["input_ids"]) - 2
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total = round(min(max(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA), SHORTEST), longest))
        content = max(total - overhead, 2)
        user = max(1, round(content * rng.uniform(0.2, 0.6)))
        rows.append({"messages": _messages(_text(rng, words, user), _text(rng, words, content - user))})
    return rows


def _messages(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _text(rng: random.Random, words: list[str], tokens: int) -> str:
    """About `tokens` tokens of sentences (a full stop is one token too)."""
    parts, left = [], tokens
    while left > 0:
        length = min(left, rng.randint(8, 16))
        sentence = " ".join(rng.choice(words) for _ in range(max(length - 1, 1)))
        parts.append(sentence + ".")
        left -= length
    return " ".join(parts)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as JSON lines (UTF-8)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def tokenize_file(path: Path, tokenizer: Any) -> list[TextSample]:
    """The file's rows as lora-scripts tokenizes chat `messages` (response tokens only carry labels)."""
    builder = SampleBuilder(tokenizer, "messages", None, MAX_SEQ_LENGTH, train_on_inputs=False)
    samples, _ = build_samples(read_rows(path), builder)
    return samples


def save_samples(path: Path, samples: list[TextSample]) -> Path:
    """Tokenized samples as JSON, for the baselines (which do not tokenize themselves)."""
    path.write_text(json.dumps([[s.input_ids, s.labels] for s in samples]), encoding="utf-8")
    return path


def load_samples(path: str | Path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs written by `save_samples`."""
    return [(ids, labels) for ids, labels in json.loads(Path(path).read_text(encoding="utf-8"))]


def length_summary(samples: list[TextSample]) -> str:
    """`48 samples, 6,210 tokens (min 21 / median 98 / max 512), 61% targets`."""
    lengths = [len(s.input_ids) for s in samples]
    targets = sum(sum(1 for label in s.labels if label != IGNORE_INDEX) for s in samples)
    return (f"{len(samples)} samples, {sum(lengths):,} tokens (min {min(lengths)} / median {statistics.median(lengths):g} / "
            f"max {max(lengths)}), {100 * targets / sum(lengths):.0f}% of tokens are targets")
