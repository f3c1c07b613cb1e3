"""The JSON-extraction demo data: the generator run from the outside, its three splits (the novel
one disjoint from training in every vocabulary and template), the committed files, and the scorer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lora_scripts.eval.json_fields import JsonScore, extract_json_object, format_table, score_json_outputs

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "tools" / "make_json_dataset.py"
COMMITTED = REPO / "data" / "json_extract"
# The command in README.md and the generator's docstring.
DOCUMENTED = {"train": 720, "heldout": 60, "novel": 60, "seed": 0}
SPLITS = ("train", "heldout", "novel")
FIELDS = {
    "order": ["type", "customer", "item", "quantity", "city", "date"],
    "patient_note": ["type", "patient", "age", "symptom", "systolic_bp", "medication"],
    "ticket": ["type", "customer", "product", "issue", "priority"],
}
# Answer fields copied verbatim from the record, and the vocabulary each comes from.
COPIED = {"customer": "names", "patient": "names", "item": "items", "city": "cities", "symptom": "symptoms",
          "medication": "medications", "product": "products", "issue": "issues"}
ZH_PUNCTUATION = re.compile("[，。：；｜（）“”—]")


def generate(out: Path, train: int, heldout: int, novel: int, seed: int, compose: float = 0.0) -> Path:
    """Run the generator as a user would and return its output folder."""
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--train", str(train), "--heldout", str(heldout),
                    "--novel", str(novel), "--seed", str(seed), "--compose", str(compose)], check=True, capture_output=True)
    return out


def read_split(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def record_text(sample: dict) -> str:
    """The record part of the user message (after the instruction)."""
    return sample["messages"][0]["content"].split("\n\n", 1)[1]


def answer(sample: dict) -> dict:
    return json.loads(sample["messages"][1]["content"])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    folder = generate(tmp_path_factory.mktemp("json_extract"), **DOCUMENTED)
    return {split: read_split(folder, split) for split in SPLITS}


@pytest.fixture(scope="module")
def package() -> ModuleType:
    """The generator's package (tools/json_dataset), imported as the script imports it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "tools"))
        import json_dataset.records

        yield json_dataset


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    sizes = {"train": 30, "heldout": 12, "novel": 12}
    first, again = generate(tmp_path / "a", **sizes, seed=0), generate(tmp_path / "b", **sizes, seed=0)
    other = generate(tmp_path / "c", **sizes, seed=1)
    for split in SPLITS:
        assert (first / f"{split}.jsonl").read_bytes() == (again / f"{split}.jsonl").read_bytes()
        assert (first / f"{split}.jsonl").read_bytes() != (other / f"{split}.jsonl").read_bytes()
    # held-out splits do not depend on the training set's size, so runs on more data score the same records
    bigger = generate(tmp_path / "d", **{**sizes, "train": 60}, seed=0)
    for split in ("heldout", "novel"):
        assert (bigger / f"{split}.jsonl").read_bytes() == (first / f"{split}.jsonl").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--compose", "1.5"], "--compose must be between 0 and 1"),
    (["--compose", "-0.1"], "--compose must be between 0 and 1"),
    (["--train", "0"], "--train, --heldout and --novel must be at least 1"),
])
def test_bad_arguments_get_one_error_line_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"make_json_dataset.py: error: {message}"
    assert "Traceback" not in proc.stderr and not out.exists()


def test_committed_files_match_documented_command(tmp_path: Path) -> None:
    fresh = generate(tmp_path / "fresh", **DOCUMENTED)
    command = " ".join(f"--{k} {v}" for k, v in DOCUMENTED.items())
    for split in SPLITS:
        assert (COMMITTED / f"{split}.jsonl").read_bytes() == (fresh / f"{split}.jsonl").read_bytes(), (
            f"data/json_extract/{split}.jsonl is stale: rerun tools/make_json_dataset.py --out data/json_extract {command}")
    assert f"make_json_dataset.py --out data/json_extract {command}" in (REPO / "README.md").read_text(encoding="utf-8")


def test_counts_and_chat_format(generated: dict[str, list[dict]]) -> None:
    assert {split: len(samples) for split, samples in generated.items()} == {s: DOCUMENTED[s] for s in SPLITS}
    for samples in generated.values():
        assert all([m["role"] for m in s["messages"]] == ["user", "assistant"] for s in samples)


@pytest.mark.parametrize("split", SPLITS)
def test_answers_have_the_type_fields_and_copy_text_verbatim(generated: dict[str, list[dict]], split: str) -> None:
    samples = generated[split]
    counts = {name: 0 for name in FIELDS}
    for sample in samples:
        user, assistant = (m["content"] for m in sample["messages"])
        instruction, text = user.split("\n\n", 1)
        fields = answer(sample)
        assert list(fields) == FIELDS[fields["type"]]
        assert assistant == json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        assert "keys: " + ", ".join(FIELDS[fields["type"]]) in re.sub(r" \([^)]*\)", "", instruction)
        assert "Copy text values verbatim" in instruction
        assert len(user) <= 500
        counts[fields["type"]] += 1
        for field in COPIED:
            if field in fields:
                assert fields[field] in text, (field, sample)
        if fields["type"] == "order":
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", fields["date"]) and type(fields["quantity"]) is int
        elif fields["type"] == "patient_note":
            assert type(fields["age"]) is int and type(fields["systolic_bp"]) is int
            assert str(fields["systolic_bp"]) in text
        else:
            assert fields["priority"] in {"low", "medium", "high"}
    assert min(counts.values()) >= len(samples) // 3
    chinese = sum(bool(ZH_PUNCTUATION.search(record_text(s))) for s in samples)  # every Chinese template has some
    assert abs(chinese - len(samples) / 2) <= 3


def test_every_vocabulary_and_template_list_is_split_before_generating(package: ModuleType) -> None:
    vocab, templates = package.vocab, package.templates
    lists = {"native names": vocab.NATIVE_SCRIPT_NAMES, "zh surnames": vocab.ZH_SURNAMES, "zh given": vocab.ZH_GIVEN,
             "zh foreign given": vocab.ZH_FOREIGN_GIVEN, "zh foreign family": vocab.ZH_FOREIGN_FAMILY,
             "ja family": vocab.JA_FAMILY, "ja given": vocab.JA_GIVEN}
    lists |= {f"{culture} given": given for culture, (given, _) in vocab.LATIN_NAMES.items()}
    lists |= {f"{culture} family": family for culture, (_, family) in vocab.LATIN_NAMES.items()}
    for table in ("CITIES", "ITEMS", "PRODUCTS", "SYMPTOMS", "MEDICATIONS", "ISSUES"):
        lists |= {f"{table} {lang}": values for lang, values in getattr(vocab, table).items()}
    lists |= {f"cues {lang} {level}": cues for lang, levels in vocab.PRIORITY_CUES.items() for level, cues in levels.items()}
    for name, table in (("template", templates.TEMPLATES), ("filler", templates.FILLERS)):
        lists |= {f"{name} {kind} {lang}": values for kind, langs in table.items() for lang, values in langs.items()}
    for name, values in lists.items():
        assert len(set(values)) == len(values), f"{name}: duplicate entries"
        pools = vocab.split_pool(values)
        assert pools["train"] and pools["novel"], name
        assert not set(pools["train"]) & set(pools["novel"]), name
        assert sorted(pools["train"] + pools["novel"], key=str) == sorted(values, key=str), name


def _names(pools) -> set[str]:
    """Every name a split's pools can produce."""
    latin = {f"{g} {f}" for given, family in pools.latin_names for g in given for f in family}
    return (latin | set(pools.native_names) | {s + g for s in pools.zh_surnames for g in pools.zh_given}
            | {f"{g}·{f}" for g in pools.zh_foreign[0] for f in pools.zh_foreign[1]}
            | {f + g for f in pools.ja_names[0] for g in pools.ja_names[1]})


def _vocabulary(pools) -> dict[str, set[str]]:
    both = lambda table: {v for values in table.values() for v in values}  # noqa: E731
    return {"names": _names(pools), "items": {item for values in pools.items.values() for item, _ in values},
            "cities": both(pools.cities), "symptoms": both(pools.symptoms), "medications": both(pools.medications),
            "products": both(pools.products), "issues": both(pools.issues)}


def _template_pattern(pools, kind: str) -> re.Pattern:
    """A record made of one of this pool's templates of `kind`, with this pool's fillers around it."""
    def regex(template: str) -> str:
        literal = [re.escape(part) for part in re.split(r"\{\w+\}", template)]
        return "(?:" + "(.+?)".join(literal) + ")"

    templates = "|".join(regex(t) for lang in ("en", "zh") for t in pools.templates[kind][lang])
    fillers = "|".join(re.escape(f).replace(r"\{n\}", r"\d+").replace(r"\{k\}", r"\d+").replace(r"\{p\}", r"\d+")
                       .replace(r"\{d\}", r"\d+") for lang in ("en", "zh") for f in pools.fillers[kind][lang])
    return re.compile(rf"(?:(?:{fillers}) ?)?(?:{templates})(?: ?(?:{fillers}))?", re.DOTALL)


def _composed_pattern(pools, kind: str, separators: dict[str, list[str]]) -> re.Pattern:
    """A training record strung together from this kind's phrases (`templates.CLAUSES`), with the
    urgency cue and fillers around it."""
    slot = lambda text: "(?:" + "(.+?)".join(re.escape(part) for part in re.split(r"\{\w+\}", text)) + ")"  # noqa: E731
    phrase = "|".join(slot(c) for lang in ("en", "zh") for choices in pools.clauses[kind][lang].values() for c in choices)
    separator = "|".join(re.escape(s) for s in {s for choices in separators.values() for s in choices})
    count = len(pools.clauses[kind]["en"])
    body = rf"(?:{phrase})(?:(?:{separator})(?:{phrase})){{{count - 1}}}[.。]"
    return re.compile(rf"(?:.+? ?)?{body}(?: ?.+?)?", re.DOTALL)


def test_novel_split_shares_no_vocabulary_or_template_with_training(generated: dict[str, list[dict]], package: ModuleType) -> None:
    pools = {split: package.records.build_pools(split) for split in ("train", "novel")}
    vocabulary = {split: _vocabulary(p) for split, p in pools.items()}
    patterns = {(split, kind): _template_pattern(p, kind) for split, p in pools.items() for kind in FIELDS}
    source = {"train": "train", "heldout": "train", "novel": "novel"}  # the familiar split uses training's pools
    train_texts = "\n".join(record_text(s) for s in generated["train"])
    for split, samples in generated.items():
        own, other = source[split], "novel" if source[split] == "train" else "train"
        for sample in samples:
            fields, text = answer(sample), record_text(sample)
            for field, table in COPIED.items():
                if field in fields:
                    assert fields[field] in vocabulary[own][table], (split, field, fields[field])
                    assert fields[field] not in vocabulary[other][table], (split, field, fields[field])
                    if split == "novel":
                        assert fields[field] not in train_texts, (field, fields[field])
            assert patterns[own, fields["type"]].fullmatch(text), (split, text)
            assert not patterns[other, fields["type"]].fullmatch(text), (split, text)


def _wording(template: str) -> set[str]:
    """The words around a template's slots, cut at punctuation: what tells a reader which value is which."""
    pieces = (re.split(r"[，。：；｜（）“”—,.;:()|\"?!]|\s-\s", part) for part in re.split(r"\{\w+\}", template))
    return {piece.strip() for split_part in pieces for piece in split_part if piece.strip()}


def test_composed_training_records_use_no_novel_wording(tmp_path: Path, package: ModuleType) -> None:
    """`--compose 0.5`: about half the training records strung together from training-only
    phrases, none worded like a novel template; the held-out splits stay template records."""
    folder = generate(tmp_path / "composed", train=240, heldout=12, novel=12, seed=0, compose=0.5)
    splits = {split: read_split(folder, split) for split in SPLITS}
    records, templates, vocab = package.records, package.templates, package.vocab
    assert records.build_pools("novel").clauses == {}  # the novel split is never composed
    for kind, languages in templates.CLAUSES.items():
        for lang, fields in languages.items():
            novel = set().union(*(_wording(t) for t in vocab.split_pool(templates.TEMPLATES[kind][lang])["novel"]))
            for phrases in fields.values():
                for phrase in phrases:
                    assert not _wording(phrase) & novel, (kind, lang, phrase)
    pools = {split: records.build_pools(split) for split in ("train", "novel")}
    template_made = 0
    for sample in splits["train"]:
        kind, text = answer(sample)["type"], record_text(sample)
        from_template = bool(_template_pattern(pools["train"], kind).fullmatch(text))
        template_made += from_template
        assert from_template or _composed_pattern(pools["train"], kind, templates.CLAUSE_SEPARATORS).fullmatch(text), text
        assert not _template_pattern(pools["novel"], kind).fullmatch(text), text
    assert 0.35 < 1 - template_made / len(splits["train"]) < 0.65
    for split, own in (("heldout", "train"), ("novel", "novel")):
        assert all(_template_pattern(pools[own], answer(s)["type"]).fullmatch(record_text(s)) for s in splits[split])
    assert splits["novel"] == read_split(generate(tmp_path / "plain", train=24, heldout=12, novel=12, seed=0), "novel")


def test_all_records_are_distinct(generated: dict[str, list[dict]]) -> None:
    texts = [record_text(s) for samples in generated.values() for s in samples]
    assert len(set(texts)) == len(texts)


def test_training_shows_every_wording_style(generated: dict[str, list[dict]]) -> None:
    pairs = [(record_text(s), answer(s)) for s in generated["train"]]
    orders = [(t, a) for t, a in pairs if a["type"] == "order"]
    written = [t for t, a in orders if a["date"] not in t]
    assert any(re.search(r"[〇一二三四五六七八九]{4}年", t) for t in written)  # 二〇二五年…
    assert any(re.search(r"\d{4}年\d{1,2}月\d{1,2}[日号]", t) for t in written)
    assert any(re.search(r"(January|February|March|April|May|June|July|August|September|October|November|December) \d", t) for t in written)
    assert any(re.search(r"\d(st|nd|rd|th) of ", t) for t in written)
    assert any(re.search(r"\d{4}/\d{1,2}/\d{1,2}", t) for t in written)
    assert any(re.search(r"\b(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)-(one|two|three|four|five|six|seven|eight|nine)\b", t) for t, _ in pairs)
    assert any(re.search(r"两[^\d]", t) and a["quantity"] == 2 for t, a in orders)
    assert any(re.search(r"[二三四五六七八九]十[一二三四五六七八九]?[台把盏个张双包条支盒袋瓶箱件本根副]", t) and a["quantity"] >= 20 for t, a in orders)
    # titles are in the text, never in the answer; measure words likewise
    assert any(re.search(r"\b(Mr|Ms|Mrs|Dr|Prof)\.? ", t) for t, _ in pairs)
    assert any(re.search(r"(先生|女士|老师|经理|医生)", t) for t, _ in pairs)
    names = [a.get("customer") or a.get("patient") for _, a in pairs]
    assert not any(re.match(r"(Mr|Ms|Mrs|Dr|Prof)\b", n) or n.endswith(("先生", "女士")) for n in names)
    assert any(f"pairs of {a['item']}" in t or f"boxes of {a['item']}" in t for t, a in orders)


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
        'Here you go:\n```json\n{"type": "order", "quantity": 3, "city": "上海", "extra": 1}\n```\nDone.',  # all right
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
