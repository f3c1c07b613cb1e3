"""The config form, generated from `TrainConfig`: fields, groups, and the text <-> YAML rules.

The form holds one text per key the user set (an unset key is absent, so the schema default
applies, as in a YAML file without that key). A text becomes a value exactly as `--set
key=text` does on the command line (`parse_overrides`: parsed as YAML), except for plain string
and path keys, which are taken verbatim. So a form, its exported YAML and the command it shows
give the same validated config.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lora_scripts.config import TrainConfig, _type_name, parse_overrides, validate_config
from lora_scripts.errors import UserError

FIELDS = TrainConfig.model_fields
_KEY_IN_BACKTICKS = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
# `base_model` is a string only because it may name a package file (`pkg:…`); it is a path too.
EXTRA_PATH_KEYS = ("base_model",)


def _members(annotation: Any) -> list[Any]:
    """The non-null members of a (possibly optional) annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def is_verbatim(name: str) -> bool:
    """Keys whose form text is taken as is: plain strings and paths."""
    members = _members(FIELDS[name].annotation)
    return len(members) == 1 and members[0] in (str, Path)


def path_keys() -> list[str]:
    """Keys that hold a file or folder path (checked against the UI's allowed roots)."""
    return [name for name, field in FIELDS.items() if Path in _members(field.annotation)] + list(EXTRA_PATH_KEYS)


def _kind(name: str) -> tuple[str, list[str]]:
    """How the form shows a key, and its choices."""
    members = _members(FIELDS[name].annotation)
    if len(members) == 1 and members[0] is bool:
        return "choice", ["true", "false"]
    if len(members) == 1 and get_origin(members[0]) is Literal:
        return "choice", [str(a) for a in get_args(members[0])]
    if len(members) == 1 and members[0] in (int, float):
        return "number", []
    if is_verbatim(name):
        return ("path" if members[0] is Path or name in EXTRA_PATH_KEYS else "text"), []
    return "yaml", []


def _groups() -> dict[str, str]:
    """Key -> the section comment above it in the schema's source (`# --- LoRA ---`)."""
    groups, current = {}, "general"
    for line in inspect.getsource(TrainConfig).splitlines():
        if heading := re.match(r"\s*# ---+ (.+?) -*$", line):
            current = heading.group(1).strip()
        elif (match := re.match(r"    (\w+): ", line)) and match.group(1) in FIELDS:
            groups[match.group(1)] = current
    return groups


def form_fields() -> list[dict[str, Any]]:
    """Every key of the schema, in schema order, as the page renders it."""
    groups = _groups()
    fields = []
    for name, field in FIELDS.items():
        kind, choices = _kind(name)
        fields.append({
            "name": name, "group": groups.get(name, "general"), "kind": kind, "choices": choices,
            "required": field.is_required(), "type": _type_name(field.annotation).replace("\\|", "|"),
            "default": None if field.is_required() else value_text(field.default),
            "description": field.description or "",
        })
    return fields


def value_text(value: Any) -> str:
    """The text that `--set key=TEXT` (YAML) turns back into exactly `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9).removesuffix("\n...\n").strip()
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


def values_to_raw(values: dict[str, str]) -> dict[str, Any]:
    """The config mapping a form's texts mean (schema order, unknown keys last); blank = unset."""
    order = {name: i for i, name in enumerate(FIELDS)}
    raw: dict[str, Any] = {}
    for key in sorted(values, key=lambda k: order.get(k, len(order))):
        text = values[key]
        if text is None or not str(text).strip():
            continue
        if key in FIELDS and is_verbatim(key):
            raw[key] = str(text)
            continue
        try:
            raw.update(parse_overrides([f"{key}={text}"]))
        except yaml.YAMLError as exc:
            raise UserError(f"`{key}` = {text!r}: not a YAML value ({getattr(exc, 'problem', exc)}); write it as on the command line's --set") from None
    return raw


def raw_to_values(raw: dict[str, Any]) -> dict[str, str]:
    """The form texts of a config mapping (inverse of `values_to_raw`); a null path or string is
    left unset (its default is null too), since those keys take their text verbatim."""
    values = {}
    for key, value in raw.items():
        verbatim = key in FIELDS and is_verbatim(key)
        if verbatim and value is None:
            continue
        values[key] = value if verbatim and isinstance(value, str) else value_text(value)
    return values


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """A config mapping from YAML text, refused as `load_config` refuses a file."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a config must be a mapping of `key: value` lines")
    return raw


def to_yaml(raw: dict[str, Any]) -> str:
    """The YAML file of a config mapping, as `lora-scripts train --config` reads it."""
    return yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)


def validate(raw: dict[str, Any], source: str = "config") -> tuple[TrainConfig | None, list[str]]:
    """The validated config, or None and the CLI's error lines (the text of `validate_config`)."""
    try:
        return validate_config(raw, source=source), []
    except UserError as exc:
        return None, str(exc).splitlines()


def errors_by_key(lines: list[str], keys: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Each error line under the keys it names (backticked, or named in a combination rule)."""
    by_key: dict[str, list[str]] = {}
    general = []
    for line in lines:
        named = [k for k in _KEY_IN_BACKTICKS.findall(line) if k in keys]
        named = named[:1] or [k for k in keys if re.search(rf"(?<![\w`]){re.escape(k)}(?![\w`])", line)]
        for key in named:
            by_key.setdefault(key, []).append(line)
        if not named:
            general.append(line)
    return by_key, general


def train_command(raw: dict[str, Any], preset: tuple[str, dict[str, Any]] | None) -> list[str]:
    """`lora-scripts train` for this config: the preset plus `--set` for each change, or the exported file."""
    if preset is None:
        return ["lora-scripts", "train", "--config", "config.yaml"]
    preset_name, base = preset
    command = ["lora-scripts", "train", "--config", preset_name]
    for key, value in raw.items():
        if key not in base or base[key] != value:
            command += ["--set", f"{key}={value_text(value)}"]
    for key in base:
        if key not in raw and key in FIELDS and not FIELDS[key].is_required():
            command += ["--set", f"{key}={value_text(FIELDS[key].default)}"]
    return command


def shell_text(command: list[str]) -> str:
    """The command as one line to paste into a shell."""
    return shlex.join(command)
