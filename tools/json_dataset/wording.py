"""How a value is written in a record: numbers as digits, English words or Chinese numerals, dates
in every style, quantities with or without measure words, names with or without a title.

These styles are shared by all splits on purpose: the training set must show every style
("every date style in the train set"); what is held back for the novel split are the
vocabularies and the sentence templates (`vocab.py`, `templates.py`).
"""

from __future__ import annotations

import datetime
import random

EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "〇一二三四五六七八九"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS_ZH = ["一", "二", "三", "四", "五", "六", "日"]


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
    """Digits three times out of five, otherwise English words or Chinese numerals."""
    if rng.random() < 0.6:
        return str(n)
    return english_number(n) if lang == "en" else chinese_number(n, counting)


def say_date(rng: random.Random, day: datetime.date, lang: str) -> str:
    """Write a date in one of the styles of its language (all of them occur in training)."""
    y, m, d = day.year, day.month, day.day
    month, suffix = MONTHS[m - 1], ordinal_suffix(d)
    if lang == "en":
        styles = [f"{month} {d}{suffix}, {y}", f"{d} {month} {y}", f"{month[:3]} {d}, {y}",
                  f"the {d}{suffix} of {month} {y}", day.isoformat(), f"{d} {month[:3]} {y}",
                  f"{month} {d} {y}", f"{WEEKDAYS_EN[day.weekday()]}, {month} {d}, {y}",
                  f"{d}{suffix} {month} {y}"]
    else:
        year_words = "".join(ZH_DIGITS[int(c)] for c in str(y))
        styles = [f"{y}年{m}月{d}日", f"{y}年{m}月{d}号", f"{y}年{m:02d}月{d:02d}日", f"{y}/{m}/{d}",
                  f"{year_words}年{chinese_number(m)}月{chinese_number(d)}日", f"{y}.{m}.{d}", day.isoformat(),
                  f"{y}年{m}月{d}日（星期{WEEKDAYS_ZH[day.weekday()]}）", f"{year_words}年{chinese_number(m)}月{chinese_number(d)}号"]
    return rng.choice(styles)


def random_date(rng: random.Random) -> datetime.date:
    """A day in 2023-2026."""
    return datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randrange(4 * 365))


def random_quantity(rng: random.Random) -> int:
    """Mostly small order quantities, sometimes up to 99 (two-digit numbers must be read whole)."""
    return rng.randint(1, 12) if rng.random() < 0.5 else rng.randint(13, 99)


def say_quantity(rng: random.Random, qty: int, item: str, unit: str, lang: str) -> str:
    """The quantity and the item together; `unit` is the measure word ("pairs", "台") or ""."""
    count = say_number(rng, qty, lang, counting=True)
    if lang == "en":
        styles = [f"{count} x {item}", f"{item} x {count}", f"{count} units of {item}", f"{item} (qty {count})",
                  f"{count} pcs of {item}", f"{count} × {item}"]
        if unit:
            styles += [f"{count} {unit} of {item}"] * 3
    else:
        styles = [f"{item}×{count}", f"{item}，数量{count}", f"{item} x{count}"]
        styles += [f"{count}{unit}{item}", f"{count}{unit}{item}", f"{item}{count}{unit}"]
    return rng.choice(styles)


EN_TITLES = ["Mr.", "Ms.", "Mrs.", "Dr.", "Prof.", "Mr", "Ms"]
ZH_TITLES = ["先生", "女士", "老师", "经理", "医生"]


def say_name(rng: random.Random, name: str, lang: str) -> str:
    """The name, a quarter of the time with a title (Mr. X, X先生), which the answer leaves out."""
    if rng.random() >= 0.25:
        return name
    if lang == "en" or not any("\u4e00" <= ch <= "\u9fff" for ch in name):
        return f"{rng.choice(EN_TITLES)} {name}"
    return name + rng.choice(ZH_TITLES)


def blood_pressure(rng: random.Random, systolic: int, diastolic: int, lang: str) -> str:
    """Blood pressure, written several ways; the systolic value is always in digits."""
    if lang == "en":
        styles = [f"BP {systolic}/{diastolic}", f"blood pressure {systolic}/{diastolic} mmHg",
                  f"BP of {systolic} over {diastolic}", f"systolic pressure {systolic}", f"BP: {systolic}/{diastolic} mmHg",
                  f"pressure {systolic}/{diastolic}"]
    else:
        styles = [f"血压{systolic}/{diastolic}", f"血压{systolic}/{diastolic}mmHg", f"收缩压{systolic}",
                  f"高压{systolic}、低压{diastolic}", f"血压：{systolic}/{diastolic} mmHg", f"测得血压{systolic}/{diastolic}"]
    return rng.choice(styles)


def say_age(rng: random.Random, age: int, lang: str) -> str:
    """The age with its unit ("67 years old", "aged 67", "六十七岁")."""
    n = say_number(rng, age, lang)
    if lang == "en":
        return rng.choice([f"{n} years old", f"aged {n}", f"age {n}", f"{n} y/o", f"{n} yrs"])
    return rng.choice([f"{n}岁", f"年龄{n}岁", f"{n}周岁"])
