"""Record types, the per-split pools they draw from, and the samples they become.

A sample is a chat row: {"messages": [user: instruction + record text, assistant: compact JSON]}.
Text values in the answer (names, item, city, symptom, medicine, product, issue) are copied
verbatim from the record; numbers, dates and priority are normalised (integers, YYYY-MM-DD,
low/medium/high).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from json_dataset import templates, vocab, wording

LANGUAGES = ("en", "zh")
SPLIT_POOLS = ("train", "novel")  # the familiar held-out split draws from "train" too
FILLER_RATE = 0.3  # chance of an unrelated sentence before the record, and again after it
Fill = tuple[dict[str, object], dict[str, str]]  # (answer fields, template slots)


@dataclass(frozen=True)
class Pools:
    """Everything one split may draw from (the "train" or the "novel" half of every list)."""

    latin_names: list[tuple[list[str], list[str]]]  # (given, family) per culture
    native_names: list[str]
    zh_surnames: list[str]
    zh_given: list[str]
    zh_foreign: tuple[list[str], list[str]]
    ja_names: tuple[list[str], list[str]]
    cities: dict[str, list[str]]
    items: dict[str, list[tuple[str, str]]]
    products: dict[str, list[str]]
    symptoms: dict[str, list[str]]
    medications: dict[str, list[str]]
    issues: dict[str, list[str]]
    cues: dict[str, dict[str, list[str]]]
    templates: dict[str, dict[str, list[str]]]
    fillers: dict[str, dict[str, list[str]]]
    clauses: dict[str, dict[str, dict[str, list[str]]]]  # training only: empty for the novel split


def build_pools(split: str) -> Pools:
    """The `split` half ("train" or "novel") of every vocabulary and template list."""
    half = lambda values: vocab.split_pool(values)[split]  # noqa: E731
    per_lang = lambda table: {lang: half(table[lang]) for lang in LANGUAGES}  # noqa: E731
    return Pools(
        latin_names=vocab.latin_name_pools()[split],
        native_names=half(vocab.NATIVE_SCRIPT_NAMES),
        zh_surnames=half(vocab.ZH_SURNAMES),
        zh_given=half(vocab.ZH_GIVEN),
        zh_foreign=(half(vocab.ZH_FOREIGN_GIVEN), half(vocab.ZH_FOREIGN_FAMILY)),
        ja_names=(half(vocab.JA_FAMILY), half(vocab.JA_GIVEN)),
        cities=per_lang(vocab.CITIES),
        items=per_lang(vocab.ITEMS),
        products=per_lang(vocab.PRODUCTS),
        symptoms=per_lang(vocab.SYMPTOMS),
        medications=per_lang(vocab.MEDICATIONS),
        issues=per_lang(vocab.ISSUES),
        cues={lang: {level: half(cues) for level, cues in vocab.PRIORITY_CUES[lang].items()} for lang in LANGUAGES},
        templates={kind: per_lang(table) for kind, table in templates.TEMPLATES.items()},
        fillers={kind: per_lang(table) for kind, table in templates.FILLERS.items()},
        clauses=templates.CLAUSES if split == "train" else {},
    )


def pick_name(rng: random.Random, pools: Pools, lang: str) -> str:
    """A person's name: English records mostly Latin script from many cultures, some in their own
    script; Chinese records mostly Chinese, some transliterated, Japanese or Latin."""
    roll = rng.random()
    if lang == "en":
        if roll < 0.15:
            return rng.choice(pools.native_names)
    elif roll < 0.65:
        return rng.choice(pools.zh_surnames) + rng.choice(pools.zh_given)
    elif roll < 0.78:
        return rng.choice(pools.zh_foreign[0]) + "·" + rng.choice(pools.zh_foreign[1])
    elif roll < 0.88:
        return rng.choice(pools.ja_names[0]) + rng.choice(pools.ja_names[1])
    given, family = rng.choice(pools.latin_names)
    return f"{rng.choice(given)} {rng.choice(family)}"


def sample_order(rng: random.Random, pools: Pools, lang: str) -> Fill:
    """Answer and slots for an order record."""
    item, unit = rng.choice(pools.items[lang])
    quantity, day = wording.random_quantity(rng), wording.random_date(rng)
    answer = {"customer": pick_name(rng, pools, lang), "item": item, "quantity": quantity,
              "city": rng.choice(pools.cities[lang]), "date": day.isoformat()}
    slots = {"customer": wording.say_name(rng, answer["customer"], lang), "item": item, "unit": unit,
             "qty": wording.say_number(rng, quantity, lang, counting=True),
             "qty_item": wording.say_quantity(rng, quantity, item, unit, lang),
             "city": answer["city"], "date": wording.say_date(rng, day, lang)}
    return answer, slots


def sample_patient_note(rng: random.Random, pools: Pools, lang: str) -> Fill:
    """Answer and slots for a patient note; the dose after the medicine is not part of the answer."""
    age, systolic = rng.randint(18, 95), rng.randint(95, 185)
    diastolic = rng.randint(60, min(110, systolic - 25))
    answer = {"patient": pick_name(rng, pools, lang), "age": age, "symptom": rng.choice(pools.symptoms[lang]),
              "systolic_bp": systolic, "medication": rng.choice(pools.medications[lang])}
    doses = {"en": ["", "", "", " 5 mg", " 20 mg daily", " 500 mg twice a day", " once daily"],
             "zh": ["", "", "", "（每日一次）", "（每次一片）", " 10mg", "（每日两次）"]}
    slots = {"patient": wording.say_name(rng, answer["patient"], lang), "symptom": answer["symptom"],
             "med": answer["medication"] + rng.choice(doses[lang]), "age": wording.say_age(rng, age, lang),
             "bp": wording.blood_pressure(rng, systolic, diastolic, lang)}
    return answer, slots


def sample_ticket(rng: random.Random, pools: Pools, lang: str) -> Fill:
    """Answer and slots for a support ticket; the priority is only implied by a cue sentence."""
    priority = rng.choice(["low", "medium", "high"])
    answer = {"customer": pick_name(rng, pools, lang), "product": rng.choice(pools.products[lang]),
              "issue": rng.choice(pools.issues[lang]), "priority": priority}
    slots = {"customer": wording.say_name(rng, answer["customer"], lang), "product": answer["product"],
             "issue": answer["issue"], "cue": rng.choice(pools.cues[lang][priority])}
    return answer, slots


@dataclass(frozen=True)
class RecordType:
    """One kind of record: its JSON keys (with hints for the instruction), what the copied text
    values leave out (`copy_note`), and its sampler."""

    name: str
    noun: str
    key_hints: dict[str, str]
    copy_note: str
    sample: Callable[[random.Random, Pools, str], Fill]

    def instruction(self) -> str:
        """The user instruction: every key in output order, and which values are copied verbatim."""
        keys = [f'type ("{self.name}")'] + [f"{k} ({h})" if h else k for k, h in self.key_hints.items()]
        return f"Extract the {self.noun} as one JSON object with keys: {', '.join(keys)}. Copy text values verbatim ({self.copy_note})."


RECORD_TYPES = (
    RecordType("order", "order", {"customer": "", "item": "", "quantity": "integer", "city": "", "date": "YYYY-MM-DD"},
               "no titles or measure words", sample_order),
    RecordType("patient_note", "patient note",
               {"patient": "", "age": "integer", "symptom": "", "systolic_bp": "integer", "medication": ""},
               "no titles or doses", sample_patient_note),
    RecordType("ticket", "support ticket", {"customer": "", "product": "", "issue": "", "priority": "low, medium or high"},
               "no titles", sample_ticket),
)


def composed_text(rng: random.Random, pools: Pools, record_type: RecordType, lang: str, slots: dict[str, str]) -> str:
    """One phrase per field from `pools.clauses`, in a random order; a ticket's urgency sentence
    goes before or after."""
    phrases = [rng.choice(choices).format(**slots) for choices in pools.clauses[record_type.name][lang].values()]
    rng.shuffle(phrases)
    text = phrases[0] + "".join(rng.choice(templates.CLAUSE_SEPARATORS[lang]) + p for p in phrases[1:])
    text += "。" if lang == "zh" else "."
    if "cue" in slots:
        space = "" if lang == "zh" else " "
        text = f"{slots['cue']}{space}{text}" if rng.random() < 0.3 else f"{text}{space}{slots['cue']}"
    return text


def record_text(rng: random.Random, pools: Pools, record_type: RecordType, lang: str, slots: dict[str, str],
                compose_rate: float = 0.0) -> str:
    """Fill a template of this pool (or, `compose_rate` of the time, string phrases together),
    sometimes with an unrelated sentence before and/or after."""
    numbers = {"n": str(rng.randint(1000, 99999)), "k": str(rng.randint(2, 30)), "p": str(rng.randint(55, 110)),
               "d": str(rng.randint(0, 9))}
    if compose_rate and rng.random() < compose_rate:
        sentences = [composed_text(rng, pools, record_type, lang, slots)]
    else:
        sentences = [rng.choice(pools.templates[record_type.name][lang]).format(**slots, **numbers)]
    fillers = rng.sample(pools.fillers[record_type.name][lang], 2)
    if rng.random() < FILLER_RATE:
        sentences.insert(0, fillers[0].format(**numbers))
    if rng.random() < FILLER_RATE:
        sentences.append(fillers[1].format(**numbers))
    return ("" if lang == "zh" else " ").join(sentences)


def make_sample(rng: random.Random, pools: Pools, record_type: RecordType, lang: str,
                compose_rate: float = 0.0) -> dict[str, list[dict[str, str]]]:
    """One chat sample: instruction + record text -> compact JSON answer with keys in fixed order."""
    answer, slots = record_type.sample(rng, pools, lang)
    text = record_text(rng, pools, record_type, lang, slots, compose_rate)
    target = json.dumps({"type": record_type.name, **answer}, ensure_ascii=False, separators=(",", ":"))
    return {"messages": [{"role": "user", "content": f"{record_type.instruction()}\n\n{text}"},
                         {"role": "assistant", "content": target}]}


def make_split(rng: random.Random, pools: Pools, count: int, seen_user_texts: set[str], compose_rate: float = 0.0,
               max_tries: int = 1000) -> list[dict]:
    """`count` samples cycling through record types and languages; user texts never repeat;
    `compose_rate` of them strung together from phrases (training only).

    Adds the new user texts to `seen_user_texts`, so a later split cannot reuse them.
    """
    samples = []
    for index in range(count):
        record_type = RECORD_TYPES[index % len(RECORD_TYPES)]
        lang = LANGUAGES[(index // len(RECORD_TYPES)) % len(LANGUAGES)]
        for _ in range(max_tries):
            sample = make_sample(rng, pools, record_type, lang, compose_rate)
            user_text = sample["messages"][0]["content"]
            if user_text not in seen_user_texts:
                break
        else:
            raise RuntimeError(f"could not draw a new unique {record_type.name}/{lang} record")
        seen_user_texts.add(user_text)
        samples.append(sample)
    rng.shuffle(samples)
    return samples
