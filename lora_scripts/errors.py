"""Errors the user can fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; the CLI prints str(exc) as one line and exits non-zero."""


def read_json(path: Path, key: str) -> Any:
    """Parse a JSON file that belongs to the config key `key`; damage is a UserError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{key} {path}: not valid JSON; the folder is damaged") from None
