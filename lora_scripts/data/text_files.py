"""Read text training rows from CSV, JSON and JSONL files (or a folder of them).

Every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lora_scripts.errors import UserError

TEXT_SUFFIXES = (".csv", ".json", ".jsonl")
Row = dict[str, Any]


def read_rows(path: Path) -> list[tuple[Row, str]]:
    """Rows of a data file or folder, each with its source (`file:line`) for messages."""
    if not path.exists():
        raise UserError(f"data not found: {path} (train_data_dir and validation_file take a CSV/JSON/JSONL file or a folder of them)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no .csv, .json or .jsonl files found")
    if path.is_dir():
        root = path.resolve()
        for file in files:
            if not file.resolve().is_relative_to(root):
                raise UserError(f"{file}: links to {file.resolve()}, outside the data folder {path}; copy the file into the folder")
    rows: list[tuple[Row, str]] = []
    for file in files:
        rows.extend(_read_file(file))
    if not rows:
        raise UserError(f"{path}: the data files hold no rows")
    return rows


def _read_file(file: Path) -> list[tuple[Row, str]]:
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise UserError(f"{file}: unsupported data file type `{suffix}`; use .csv, .json or .jsonl")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    if suffix == ".csv":
        return _read_csv(file, text)
    if suffix == ".jsonl":
        return _read_jsonl(file, text)
    return _read_json(file, text)


def _read_csv(file: Path, text: str) -> list[tuple[Row, str]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        return []
    rows = []
    for row in reader:
        if None in row:
            raise UserError(f"{file}:{reader.line_num}: more values than header columns ({', '.join(reader.fieldnames)}); quote fields that contain commas")
        rows.append((dict(row), f"{file}:{reader.line_num}"))
    return rows


def _read_jsonl(file: Path, text: str) -> list[tuple[Row, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{number}: broken JSON line ({exc.msg} at column {exc.colno}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{file}:{number}: each JSONL line must be a JSON object, got {type(row).__name__}")
        rows.append((row, f"{file}:{number}"))
    return rows


def _read_json(file: Path, text: str) -> list[tuple[Row, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise UserError(f"{file}: a .json data file must hold a list of objects (or use .jsonl, one object per line)")
    return [(row, f"{file}[{index}]") for index, row in enumerate(data)]
