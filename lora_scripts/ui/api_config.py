"""Config page API: the schema as a form, presets, validation, YAML import/export, the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from lora_scripts.atomic import write_bytes_atomically
from lora_scripts.config import TrainConfig
from lora_scripts.demo import REPO_ROOT
from lora_scripts.errors import UserError
from lora_scripts.ui import form
from lora_scripts.ui.context import UiContext, context
from lora_scripts.ui.security import PathGuard

router = APIRouter()
PRESET_FOLDER = Path("configs") / "examples"


class ValuesBody(BaseModel):
    """A form: one text per key the user set."""

    values: dict[str, str]
    preset: str | None = None  # the preset the form started from (for the command)


class ImportBody(BaseModel):
    text: str
    filename: str = "config.yaml"


class SaveBody(ValuesBody):
    path: str
    overwrite: bool = False


def presets(cwd: Path) -> dict[str, Path]:
    """`configs/examples/*.yaml` of the working directory and of this checkout, by display name."""
    found: dict[str, Path] = {}
    for root in (cwd, REPO_ROOT):
        for path in sorted((root / PRESET_FOLDER).glob("*.yaml")):
            name = str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)
            found.setdefault(name, path)
    return found


def check_config_paths(guard: PathGuard, raw: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """One line per path key of the config that lies outside the allowed roots."""
    problems = []
    for key in form.path_keys():
        value = getattr(cfg, key)
        if not isinstance(value, (str, Path)) or (key in form.EXTRA_PATH_KEYS and str(raw.get(key, "")).startswith("pkg:")):
            continue  # unset, a list of prompts, or a file shipped in an installed package
        try:
            guard.check(value, f"`{key}`")
        except UserError as exc:
            problems.append(str(exc))
    return problems


def checked_config(ui: UiContext, values: dict[str, str], source: str = "config") -> tuple[dict[str, Any], TrainConfig]:
    """The raw mapping and validated config of a form; UserError with the CLI's text if invalid,
    or naming each path outside the allowed roots."""
    raw = form.values_to_raw(values)
    cfg, errors = form.validate(raw, source)
    if cfg is None:
        raise UserError("\n".join(errors))
    problems = check_config_paths(ui.guard, raw, cfg)
    if problems:
        raise UserError("\n".join(problems))
    return raw, cfg


@router.get("/schema")
def schema() -> dict[str, Any]:
    """Every config key with its group, kind, default and description."""
    fields = form.form_fields()
    return {"fields": fields, "groups": list(dict.fromkeys(f["group"] for f in fields))}


@router.get("/presets")
def list_presets(ui: UiContext = Depends(context)) -> list[dict[str, str]]:
    """The example configs a form can start from."""
    return [{"name": name} for name in presets(ui.settings.cwd)]


@router.get("/presets/values")
def preset_values(name: str, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """The form texts of one preset."""
    path = presets(ui.settings.cwd).get(name)
    if path is None:
        raise UserError(f"no preset {name!r}; choose one of {', '.join(presets(ui.settings.cwd)) or '(none found)'}")
    return {"name": name, "values": form.raw_to_values(form.parse_yaml(path.read_text(encoding="utf-8-sig"), name))}


@router.post("/config/validate")
def validate(body: ValuesBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """The CLI's validation messages for a form, each under the key it names, plus its YAML."""
    try:
        raw = form.values_to_raw(body.values)
    except UserError as exc:
        lines = str(exc).splitlines()
        by_key, general = form.errors_by_key(lines, list(body.values))
        return {"ok": False, "message": str(exc), "errors": by_key, "general": general, "yaml": ""}
    cfg, lines = form.validate(raw)
    if cfg is not None:
        lines = check_config_paths(ui.guard, raw, cfg)
    keys = list(dict.fromkeys([*TrainConfig.model_fields, *body.values]))
    by_key, general = form.errors_by_key(lines, keys)
    return {"ok": not lines, "message": "\n".join(lines), "errors": by_key, "general": general, "yaml": form.to_yaml(raw)}


@router.post("/config/import")
def import_yaml(body: ImportBody) -> dict[str, Any]:
    """The form texts of an uploaded YAML config (refused as the CLI refuses a broken file)."""
    return {"values": form.raw_to_values(form.parse_yaml(body.text, body.filename))}


@router.post("/config/export")
def export_yaml(body: ValuesBody) -> dict[str, str]:
    """The YAML file of a form, exactly what `lora-scripts train --config` reads."""
    return {"yaml": form.to_yaml(form.values_to_raw(body.values))}


@router.post("/config/save")
def save_yaml(body: SaveBody, ui: UiContext = Depends(context)) -> dict[str, str]:
    """Write the form's YAML to a path inside the allowed roots (never over a file unless asked)."""
    text = form.to_yaml(form.values_to_raw(body.values))
    path = ui.guard.check(body.path, "save path")
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"save path {body.path}: name the file .yaml")
    if path.exists() and not body.overwrite:
        raise UserError(f"{body.path} already exists; choose another name or tick overwrite")
    write_bytes_atomically(path, text.encode("utf-8"))
    return {"path": str(path), "command": form.shell_text(["lora-scripts", "train", "--config", body.path])}


@router.post("/config/command")
def command(body: ValuesBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """`lora-scripts train …` for this form: its preset plus `--set` overrides when it started from one."""
    raw = form.values_to_raw(body.values)
    preset = None
    if body.preset:
        path = presets(ui.settings.cwd).get(body.preset)
        if path is None:
            raise UserError(f"no preset {body.preset!r}")
        preset = (body.preset, form.parse_yaml(path.read_text(encoding="utf-8-sig"), body.preset))
    argv = form.train_command(raw, preset)
    note = "" if preset else "save the exported YAML as config.yaml first"
    return {"argv": argv, "shell": form.shell_text(argv), "note": note}
