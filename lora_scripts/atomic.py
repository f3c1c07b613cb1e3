"""Writes that a crash cannot leave half done: write under a temporary name, flush, rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_tree(folder: Path) -> None:
    """Flush every file in a folder, and the folder itself, to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames into it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(folder: Path, write: Callable[[Path], Any]) -> None:
    """Run `write(tmp)` into a fresh temporary folder, then move its files into `folder`.

    Each file appears under its final name complete or not at all.
    """
    tmp = folder / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = folder / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomically(path: Path, payload: bytes) -> None:
    """Replace `path` with `payload`: the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path.parent, lambda tmp: (tmp / path.name).write_bytes(payload))
