"""Generate the JSON-extraction demo dataset: short English/Chinese records -> one JSON object.

Deterministic for a given seed (stdlib only). Each output line is a chat sample:
{"messages": [{"role": "user", ...}, {"role": "assistant", "content": "<compact JSON>"}]}.
Answers are normalised (dates as YYYY-MM-DD, numbers as ints, priority as low/medium/high)
while the record text varies the surface form (number words, date styles, urgency cues).

    python tools/make_json_dataset.py --out data/json_extract --train 480 --heldout 48 --seed 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LANGUAGES = ("en", "zh")
MAX_TRIES_PER_SAMPLE = 1000

# ---------------------------------------------------------------- vocabularies
NAMES = {
    "en": ["Alice Martin", "Ben Carter", "Chloe Nguyen", "David Kim", "Emma Rossi", "Farid Haddad",
           "Grace Lee", "Hiro Tanaka", "Isla Murphy", "Jonas Weber", "Keisha Brown", "Maria Garcia",
           "Noah Schmidt", "Olivia Chen", "Priya Patel", "Sam Wilson"],
    "zh": ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄丽", "周杰", "吴昊", "徐婷",
           "孙强", "马超", "朱琳", "胡军", "郭晶"],
}
CITIES = {
    "en": ["London", "Toronto", "Sydney", "Chicago", "Berlin", "Singapore", "Dublin", "Austin",
           "Seattle", "Melbourne", "Boston", "Vancouver"],
    "zh": ["上海", "北京", "广州", "深圳", "杭州", "成都", "南京", "武汉", "西安", "苏州", "重庆", "厦门"],
}
# Chinese items carry their measure word (台, 把, ...), used between the number and the item.
ITEMS = {
    "en": [("desk lamp", ""), ("wireless mouse", ""), ("office chair", ""), ("water bottle", ""),
           ("laptop stand", ""), ("USB-C cable", ""), ("coffee grinder", ""), ("yoga mat", ""),
           ("backpack", ""), ("electric kettle", ""), ("monitor arm", ""), ("notebook", "")],
    "zh": [("笔记本电脑", "台"), ("办公椅", "把"), ("台灯", "盏"), ("无线鼠标", "个"), ("保温杯", "个"),
           ("电水壶", "个"), ("瑜伽垫", "张"), ("双肩包", "个"), ("显示器", "台"), ("咖啡机", "台"),
           ("蓝牙耳机", "副"), ("USB-C数据线", "根")],
}
SYMPTOMS = {
    "en": ["persistent cough", "chest pain", "shortness of breath", "severe headache", "dizziness",
           "lower back pain", "high fever", "nausea", "fatigue", "joint pain", "sore throat",
           "blurred vision"],
    "zh": ["持续咳嗽", "胸痛", "呼吸急促", "剧烈头痛", "头晕", "腰痛", "高烧", "恶心", "乏力", "关节痛",
           "咽喉痛", "视力模糊"],
}
MEDICATIONS = {
    "en": ["amlodipine", "lisinopril", "metformin", "ibuprofen", "paracetamol", "atorvastatin",
           "omeprazole", "amoxicillin", "losartan", "aspirin"],
    "zh": ["氨氯地平", "赖诺普利", "二甲双胍", "布洛芬", "对乙酰氨基酚", "阿托伐他汀", "奥美拉唑",
           "阿莫西林", "氯沙坦", "阿司匹林"],
}
PRODUCTS = {
    "en": ["Kindle Paperwhite", "Pixel 8", "AirPods Pro", "ThinkPad X1", "Galaxy Tab S9", "Echo Dot",
           "Surface Laptop", "Switch OLED", "Fitbit Charge 6", "Roku Stick"],
    "zh": ["华为MatePad", "小米手环8", "AirPods Pro", "iPhone 15", "联想小新", "大疆Mini 4",
           "美的空调", "海尔冰箱", "Kindle", "OPPO Reno"],
}
ISSUES = {
    "en": ["fast battery drain", "screen flickering", "no power at all", "Wi-Fi dropouts",
           "loose charging port", "crackling speaker", "app crashes on launch",
           "unresponsive touchscreen", "overheating", "Bluetooth pairing failures"],
    "zh": ["电池耗电快", "屏幕闪烁", "无法开机", "Wi-Fi频繁断开", "充电口松动", "扬声器有杂音", "应用闪退",
           "触摸屏失灵", "机身过热", "蓝牙无法配对"],
}
# Urgency cues imply the priority; some low cues contain "urgent"/"紧急" on purpose.
PRIORITY_CUES = {
    "en": {"high": ["This is urgent.", "Need a fix ASAP.", "It is critical for our business.",
                    "Please escalate immediately."],
           "medium": ["Please look into it this week.", "Moderately important.",
                      "Would like a fix soon-ish.", "Normal priority."],
           "low": ["No rush.", "Whenever you have time.", "Low priority.", "Not urgent at all."]},
    "zh": {"high": ["紧急！", "非常紧急，请马上处理。", "十万火急。", "请立即升级处理。"],
           "medium": ["请这周内处理。", "一般优先级。", "希望近期能修好。", "优先级中等。"],
           "low": ["不急。", "有空再看就行。", "优先级低。", "一点都不紧急。"]},
}

# ---------------------------------------------------------------- number and date wording
EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "〇一二三四五六七八九"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def english_number(n: int) -> str:
    """Spell 0 <= n < 100 in English words, e.g. 67 -> "sixty-seven"."""
    if n < 20:
        return EN_ONES[n]
    tens, ones = divmod(n, 10)
    return EN_TENS[tens] + (f"-{EN_ONES[ones]}" if ones else "")


def chinese_number(n: int, counting: bool = False) -> str:
    """Spell 0 < n < 100 in Chinese numerals; counting=True uses 两 for 2 (两台, not 二台)."""
    if n == 2 and counting:
        return "两"
    tens, ones = divmod(n, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else ZH_DIGITS[tens] + "十")
    return head + (ZH_DIGITS[ones] if ones else "")


def ordinal_suffix(day: int) -> str:
    """English ordinal suffix: 1st, 2nd, 3rd, 4th, 11th, 22nd."""
    if 10 <= day % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def say_number(rng: random.Random, n: int, lang: str, counting: bool = False) -> str:
    """Digits two times out of three, otherwise words."""
    if rng.random() < 2 / 3:
        return str(n)
    return english_number(n) if lang == "en" else chinese_number(n, counting)


def say_date(rng: random.Random, day: datetime.date, lang: str) -> str:
    """Write a date in one of several styles of the given language."""
    y, m, d = day.year, day.month, day.day
    styles = {
        "en": [f"{MONTHS[m - 1]} {d}{ordinal_suffix(d)}, {y}", f"{d} {MONTHS[m - 1]} {y}",
               f"{MONTHS[m - 1][:3]} {d}, {y}", f"the {d}{ordinal_suffix(d)} of {MONTHS[m - 1]} {y}",
               day.isoformat()],
        "zh": [f"{y}年{m}月{d}日", f"{y}年{m}月{d}号", f"{y}年{m:02d}月{d:02d}日", f"{y}/{m}/{d}",
               "".join(ZH_DIGITS[int(c)] for c in str(y)) + f"年{chinese_number(m)}月{chinese_number(d)}日"],
    }
    return rng.choice(styles[lang])


def random_date(rng: random.Random) -> datetime.date:
    """A day in 2024-2025."""
    return datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(731))


# ---------------------------------------------------------------- record types
Fill = tuple[dict[str, object], dict[str, str]]  # (answer fields, template slots)


def sample_order(rng: random.Random, lang: str) -> Fill:
    """Answer and slots for an order record."""
    item, measure = rng.choice(ITEMS[lang])
    quantity, day = rng.randint(1, 12), random_date(rng)
    answer = {"customer": rng.choice(NAMES[lang]), "item": item, "quantity": quantity,
              "city": rng.choice(CITIES[lang]), "date": day.isoformat()}
    slots = {"customer": answer["customer"], "item": item, "city": answer["city"], "unit": measure,
             "qty": say_number(rng, quantity, lang, counting=True), "date": say_date(rng, day, lang)}
    return answer, slots


def sample_patient_note(rng: random.Random, lang: str) -> Fill:
    """Answer and slots for a patient note; blood pressure is written several ways."""
    age, systolic = rng.randint(18, 92), rng.randint(95, 185)
    diastolic = rng.randint(60, min(110, systolic - 25))
    answer = {"patient": rng.choice(NAMES[lang]), "age": age, "symptom": rng.choice(SYMPTOMS[lang]),
              "systolic_bp": systolic, "medication": rng.choice(MEDICATIONS[lang])}
    bp_styles = {
        "en": [f"BP {systolic}/{diastolic}", f"blood pressure {systolic}/{diastolic} mmHg",
               f"BP of {systolic} over {diastolic}", f"systolic pressure {systolic}"],
        "zh": [f"血压{systolic}/{diastolic}", f"血压{systolic}/{diastolic}mmHg", f"收缩压{systolic}",
               f"高压{systolic}、低压{diastolic}"],
    }
    slots = {"patient": answer["patient"], "symptom": answer["symptom"], "med": answer["medication"],
             "age": say_number(rng, age, lang), "bp": rng.choice(bp_styles[lang])}
    return answer, slots


def sample_ticket(rng: random.Random, lang: str) -> Fill:
    """Answer and slots for a support ticket; the priority is only implied by a cue sentence."""
    priority = rng.choice(["low", "medium", "high"])
    answer = {"customer": rng.choice(NAMES[lang]), "product": rng.choice(PRODUCTS[lang]),
              "issue": rng.choice(ISSUES[lang]), "priority": priority}
    slots = {"customer": answer["customer"], "product": answer["product"], "issue": answer["issue"],
             "cue": rng.choice(PRIORITY_CUES[lang][priority])}
    return answer, slots


@dataclass(frozen=True)
class RecordType:
    """One kind of record: its JSON keys (with hints for the instruction), templates, sampler."""

    name: str
    noun: str
    key_hints: dict[str, str]
    templates: dict[str, list[str]]
    sample: Callable[[random.Random, str], Fill]

    def instruction(self) -> str:
        """The user instruction naming every key of this record type, in output order."""
        keys = [f'type ("{self.name}")'] + [f"{k} ({h})" if h else k for k, h in self.key_hints.items()]
        return f"Extract the {self.noun} as one JSON object with keys: {', '.join(keys)}."


RECORD_TYPES = (
    RecordType("order", "order", {"customer": "", "item": "", "quantity": "integer", "city": "",
                                  "date": "YYYY-MM-DD"}, {
        "en": ["{customer} ordered {qty} x {item} on {date}, ship to {city}.",
               "Order from {customer}: {qty} units of {item}, placed {date}, delivery city {city}.",
               "On {date}, {customer} bought {qty} of item '{item}' for delivery in {city}.",
               "New order ({date}) - customer {customer}, {item} x {qty}, ship to {city}.",
               "Please send {qty} units of {item} to {customer} in {city}. Ordered {date}.",
               "{city} delivery for {customer}: item {item}, quantity {qty}, order date {date}.",
               "Hi, this is {customer}. I'd like {qty} x {item} delivered to {city}. Today is {date}.",
               "Item: {item}. Qty: {qty}. Buyer: {customer} ({city}). Date: {date}.",
               "{customer} from {city} placed an order for {qty} units of {item} on {date}."],
        "zh": ["{customer}于{date}订购了{qty}{unit}{item}，收货城市{city}。",
               "订单：客户{customer}，商品{item}，数量{qty}{unit}，下单日期{date}，发往{city}。",
               "{date}，{city}的{customer}下单买了{qty}{unit}{item}。",
               "您好，我是{customer}，想要{qty}{unit}{item}，送到{city}。今天是{date}。",
               "新订单（{date}）：{item}×{qty}，客户{customer}，城市{city}。",
               "请给{city}的{customer}发{qty}{unit}{item}，订单日期{date}。",
               "商品：{item}；数量：{qty}；买家：{customer}（{city}）；日期：{date}。",
               "{customer}在{date}从{city}订了{qty}{unit}{item}。",
               "客户{customer}（{city}）{date}下单：{item}{qty}{unit}。"],
    }, sample_order),
    RecordType("patient_note", "patient note", {"patient": "", "age": "integer", "symptom": "",
                                                "systolic_bp": "integer", "medication": ""}, {
        "en": ["{patient}, {age} years old, presents with {symptom}; {bp}; started on {med}.",
               "Patient {patient} (age {age}) complains of {symptom}; {bp}; prescribed {med}.",
               "Seen today: {patient}, aged {age}. Main complaint: {symptom}. Vitals: {bp}. Plan: {med}.",
               "{patient}, a {age}-year-old, reports {symptom}. Vitals: {bp}. Rx {med}.",
               "Note: {patient} came in with {symptom}, age {age}, {bp}, given {med}.",
               "Chief complaint {symptom}. Patient: {patient}, {age} y/o. Measured {bp}. Medication: {med}.",
               "{patient} ({age}) was prescribed {med} for {symptom}; {bp} at intake.",
               "Follow-up for {patient}, age {age}: still has {symptom}, {bp}, continue {med}."],
        "zh": ["{patient}，{age}岁，主诉{symptom}，{bp}，予{med}治疗。",
               "患者{patient}（{age}岁）因{symptom}就诊；{bp}；处方：{med}。",
               "今日接诊{patient}，年龄{age}岁，主要症状{symptom}，{bp}，开具{med}。",
               "{age}岁患者{patient}自述{symptom}。生命体征：{bp}。用药：{med}。",
               "记录：{patient}因{symptom}来院，{age}岁，{bp}，给予{med}。",
               "主诉：{symptom}。患者：{patient}，{age}岁。{bp}。药物：{med}。",
               "{patient}（{age}岁）因{symptom}开了{med}，入院时{bp}。",
               "复诊：{patient}，{age}岁，仍有{symptom}，{bp}，继续服用{med}。"],
    }, sample_patient_note),
    RecordType("ticket", "support ticket", {"customer": "", "product": "", "issue": "",
                                            "priority": "low, medium or high"}, {
        "en": ["{customer} writes: {product} problem - {issue}. {cue}",
               "Ticket from {customer} about {product}: {issue}. {cue}",
               "Customer {customer} reports {issue} on their {product}. {cue}",
               "{cue} {customer}'s {product} shows {issue}.",
               "Hello support, {customer} here. Problem: {issue} ({product}). {cue}",
               "Product: {product}. Reported by {customer}. Issue: {issue}. {cue}",
               "{customer} says the {product} suffers from {issue}. {cue}",
               "Complaint - {product}, {issue}, customer {customer}. {cue}"],
        "zh": ["{customer}反馈：我的{product}{issue}。{cue}",
               "工单：客户{customer}，产品{product}，问题：{issue}。{cue}",
               "{customer}报告{product}出现{issue}的问题。{cue}",
               "{cue}{customer}的{product}{issue}。",
               "客服你好，我是{customer}，{product}{issue}。{cue}",
               "产品：{product}；报告人：{customer}；问题：{issue}。{cue}",
               "{customer}说{product}一直{issue}。{cue}",
               "投诉：{product}，{issue}，客户{customer}。{cue}"],
    }, sample_ticket),
)


# ---------------------------------------------------------------- samples and splits
def make_sample(rng: random.Random, record_type: RecordType, lang: str) -> dict[str, list[dict[str, str]]]:
    """One chat sample: instruction + record text -> compact JSON answer with keys in fixed order."""
    answer, slots = record_type.sample(rng, lang)
    record = rng.choice(record_type.templates[lang]).format(**slots)
    target = json.dumps({"type": record_type.name, **answer}, ensure_ascii=False, separators=(",", ":"))
    return {"messages": [{"role": "user", "content": f"{record_type.instruction()}\n\n{record}"},
                         {"role": "assistant", "content": target}]}


def make_split(rng: random.Random, count: int, seen_user_texts: set[str]) -> list[dict]:
    """`count` samples cycling through record types and languages; user texts never repeat.

    Adds the new user texts to `seen_user_texts`, so a later split cannot reuse them.
    """
    samples = []
    for index in range(count):
        record_type = RECORD_TYPES[index % len(RECORD_TYPES)]
        lang = LANGUAGES[(index // len(RECORD_TYPES)) % len(LANGUAGES)]
        for _ in range(MAX_TRIES_PER_SAMPLE):
            sample = make_sample(rng, record_type, lang)
            user_text = sample["messages"][0]["content"]
            if user_text not in seen_user_texts:
                break
        else:
            raise RuntimeError(f"could not draw a new unique {record_type.name}/{lang} record")
        seen_user_texts.add(user_text)
        samples.append(sample)
    rng.shuffle(samples)
    return samples


def write_jsonl(path: Path, samples: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, keeping Chinese readable."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


def main() -> None:
    """Parse the command line and write train.jsonl and heldout.jsonl under --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--train", type=int, default=480, help="number of training samples")
    parser.add_argument("--heldout", type=int, default=48, help="number of held-out samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    if args.train < 1 or args.heldout < 1:
        parser.error("--train and --heldout must be at least 1")
    rng = random.Random(args.seed)
    seen: set[str] = set()
    train = make_split(rng, args.train, seen)
    heldout = make_split(rng, args.heldout, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out samples to {args.out}")


if __name__ == "__main__":
    main()
