"""Captions a person already wrote, and atomic writing of metadata.csv, .txt sidecars and embeddings."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_scripts.atomic import write_bytes_atomically
from lora_scripts.errors import UserError

METADATA_FIELDS = ["filename", "prompt"]


def sidecar_path(root: Path, relative_image: str) -> Path:
    """The kohya-style caption file next to an image: `photo.png` → `photo.txt`."""
    return (root / relative_image).with_suffix(".txt")


def has_sidecar_caption(root: Path, relative_image: str) -> bool:
    """True when the image already has a non-blank .txt caption."""
    path = sidecar_path(root, relative_image)
    return path.is_file() and bool(path.read_text(encoding="utf-8", errors="replace").strip())


@dataclass
class MetadataCsv:
    """A `filename,prompt` table; extra columns and row order of an existing file are preserved."""

    fieldnames: list[str] = field(default_factory=lambda: list(METADATA_FIELDS))
    rows: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> MetadataCsv:
        """Read `path` (an empty table if it does not exist). Raises UserError if it lacks the columns."""
        if not path.exists():
            return cls()
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle)
                fieldnames = list(reader.fieldnames or [])
                rows = [{key: value or "" for key, value in row.items() if key is not None} for row in reader]
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8 (CSV UTF-8 in Excel)") from exc
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
        missing = [name for name in METADATA_FIELDS if name not in fieldnames]
        if missing:
            raise UserError(f"{path} has no {' / '.join(missing)} column; its header must start with `filename,prompt`")
        return cls(fieldnames=fieldnames, rows=rows)

    def captioned(self) -> set[str]:
        """Filenames that already have a non-blank prompt."""
        return {row["filename"] for row in self.rows if row["prompt"].strip()}

    def update(self, captions: dict[str, str]) -> None:
        """Set the prompt of existing rows in place; append rows for new filenames in sorted order."""
        for row in self.rows:
            if row["filename"] in captions:
                row["prompt"] = captions[row["filename"]]
        present = {row["filename"] for row in self.rows}
        for filename in sorted(set(captions) - present):
            blank_row = {name: "" for name in self.fieldnames}
            self.rows.append(blank_row | {"filename": filename, "prompt": captions[filename]})

    def write(self, path: Path) -> None:
        """Write as UTF-8 CSV, atomically."""
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomically(path, buffer.getvalue().encode("utf-8"))


def write_embeddings(path: Path, embeddings: dict[str, np.ndarray]) -> None:
    """Save `{relative image path: unit vector}` as an .npz archive, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **embeddings)
    write_bytes_atomically(path, buffer.getvalue())
