"""The JSON-extraction demo data: generator run from the outside, committed files, and the scorer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_scripts.eval.json_fields import JsonScore, extract_json_object, format_table, score_json_outputs

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "tools" / "make_json_dataset.py"
COMMITTED = REPO / "data" / "json_extract"
FIELDS = {
    "order": ["type", "customer", "item", "quantity", "city", "date"],
    "patient_note": ["type", "patient", "age", "symptom", "systolic_bp", "medication"],
    "ticket": ["type", "customer", "product", "issue", "priority"],
}
HAN = re.compile(r"[\u4e00-\u9fff]")


def generate(out: Path, train: int = 480, heldout: int = 48, seed: int = 0) -> Path:
    """Run the generator as a user would and return its output folder."""
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--train", str(train),
                    "--heldout", str(heldout), "--seed", str(seed)], check=True, capture_output=True)
    return out


def read_split(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def record_text(sample: dict) -> str:
    """The record part of the user message (after the instruction)."""
    return sample["messages"][0]["content"].split("\n\n", 1)[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("json_extract"))


def test_same_seed_gives_identical_bytes_and_other_seed_differs(generated: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again")
    other = generate(tmp_path / "other", seed=1)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (again / name).read_bytes() == (generated / name).read_bytes()
        assert (other / name).read_bytes() != (generated / name).read_bytes()


def test_committed_files_match_documented_command(generated: Path) -> None:
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (COMMITTED / name).read_bytes() == (generated / name).read_bytes(), (
            f"data/json_extract/{name} is stale: rerun tools/make_json_dataset.py "
            "--out data/json_extract --train 480 --heldout 48 --seed 0")


def test_counts_and_chat_format(generated: Path, tmp_path: Path) -> None:
    assert len(read_split(generated / "train.jsonl")) == 480
    assert len(read_split(generated / "heldout.jsonl")) == 48
    small = generate(tmp_path / "small", train=7, heldout=5)
    assert [len(read_split(small / n)) for n in ("train.jsonl", "heldout.jsonl")] == [7, 5]
    for sample in read_split(small / "train.jsonl"):
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("split", ["train.jsonl", "heldout.jsonl"])
def test_answers_parse_with_exactly_the_type_fields(generated: Path, split: str) -> None:
    samples = read_split(generated / split)
    counts = {name: 0 for name in FIELDS}
    for sample in samples:
        user, assistant = (m["content"] for m in sample["messages"])
        answer = json.loads(assistant)
        assert list(answer) == FIELDS[answer["type"]]
        assert assistant == json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        assert "keys: " + ", ".join(FIELDS[answer["type"]]) in re.sub(r" \([^)]*\)", "", user.split("\n\n")[0])
        assert len(user.split()) <= 70 and len(user) <= 400
        counts[answer["type"]] += 1
        if answer["type"] == "order":
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer["date"]) and isinstance(answer["quantity"], int)
        elif answer["type"] == "patient_note":
            assert isinstance(answer["age"], int) and isinstance(answer["systolic_bp"], int)
            assert str(answer["systolic_bp"]) in user
        else:
            assert answer["priority"] in {"low", "medium", "high"}
        for field in ("customer", "patient", "item", "city", "symptom", "medication", "product", "issue"):
            if field in answer:
                assert answer[field] in record_text(sample), (field, sample)
    assert min(counts.values()) >= len(samples) // 3


def test_heldout_texts_unseen_in_train_and_both_languages_in_both_splits(generated: Path) -> None:
    train = read_split(generated / "train.jsonl")
    heldout = read_split(generated / "heldout.jsonl")
    train_records = {record_text(s) for s in train}
    assert len(train_records) == len(train)
    assert not train_records & {record_text(s) for s in heldout}
    for split in (train, heldout):
        chinese = sum(bool(HAN.search(record_text(s))) for s in split)
        assert len(split) // 3 <= chinese <= 2 * len(split) // 3


def test_dates_and_number_words_are_normalised(generated: Path) -> None:
    samples = read_split(generated / "train.jsonl")
    pairs = [(record_text(s), json.loads(s["messages"][1]["content"])) for s in samples]
    spelled = [(text, a) for text, a in pairs if a["type"] == "order" and a["date"] not in text]
    assert any("年" in text for text, _ in spelled) and any(re.search(r"[A-Z][a-z]+ \d", t) for t, _ in spelled)
    assert any("sixty" in text and a["age"] // 10 == 6 for text, a in pairs if a["type"] == "patient_note")
    assert any(re.search(r"两[台把盏个张副根]", text) and a["quantity"] == 2 for text, a in pairs
               if a["type"] == "order")


def test_extract_json_object_handles_fences_prose_and_failures() -> None:
    assert extract_json_object('```json\n{"a": 1, "b": "x}"}\n```') == {"a": 1, "b": "x}"}
    assert extract_json_object('Sure! Here it is: {"a": {"b": [1, 2]}} and {"c": 3}') == {"a": {"b": [1, 2]}}
    assert extract_json_object('{"a": 1, "b": "cut off') is None
    assert extract_json_object("{'a': 1}") is None
    assert extract_json_object("[1, 2]") is None
    assert extract_json_object("no json here") is None


def test_score_counts_parse_failures_wrong_fields_and_types() -> None:
    references = [
        {"type": "order", "quantity": 3, "city": "上海"},
        {"type": "order", "quantity": 2, "city": "Berlin"},
        {"type": "ticket", "priority": "high"},
        {"type": "ticket", "priority": "low"},
    ]
    predictions = [
        '```json\n{"type": "order", "quantity": 3, "city": "上海", "extra": 1}\n```',  # all right
        '{"type": "order", "quantity": "2", "city": "berlin"}',  # "2" != 2, wrong case
        "I cannot help with that.",  # unparseable
        '{"type": "ticket"}',  # priority missing
    ]
    score = score_json_outputs(predictions, references)
    assert score == JsonScore(n=4, parse_rate=0.75, exact_match=0.25,
                              field_accuracy={"type": 0.75, "quantity": 0.5, "city": 0.5, "priority": 0.0})
    with pytest.raises(ValueError, match="one prediction per reference"):
        score_json_outputs(predictions[:3], references)


def test_format_table_has_one_row_per_metric() -> None:
    before = JsonScore(n=48, parse_rate=0.25, field_accuracy={"type": 0.5, "date": 0.0}, exact_match=0.0)
    after = JsonScore(n=48, parse_rate=1.0, field_accuracy={"type": 1.0, "date": 0.875}, exact_match=0.75)
    table = format_table(before, after)
    lines = table.splitlines()
    assert len(lines) == 6
    assert re.search(r"parse rate\s+25\.0%\s+100\.0%\s+\+75\.0pt", table)
    assert re.search(r"exact match\s+0\.0%\s+75\.0%\s+\+75\.0pt", table)
    assert re.search(r"field: date\s+0\.0%\s+87\.5%\s+\+87\.5pt", table)
    assert re.search(r"samples\s+48\s+48", table)
