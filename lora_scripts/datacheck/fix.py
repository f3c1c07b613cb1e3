"""`check-data --fix`: the safe repairs. Files are moved to `rejected/`, never deleted."""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from lora_scripts.data.image_index import REJECTED_FOLDER, ImageIndex, normalized_row_path, read_metadata_table
from lora_scripts.datacheck.report import Report
from lora_scripts.atomic import write_atomically, write_bytes_atomically

# Findings whose items are moved out of the dataset (for duplicates the first copy stays).
MOVED_CHECKS = ("unreadable", "exact_duplicate")


@dataclass
class FixSummary:
    """What `fix_dataset` changed."""

    moved: dict[str, Path] = field(default_factory=dict)  # image rel -> where it went
    resized: dict[str, str] = field(default_factory=dict)  # image rel -> "4000x3000 -> 1024x768"
    metadata_backup: Path | None = None

    def format_terminal(self) -> str:
        """One line per change, for the CLI."""
        lines = [f"moved {rel} -> {target}" for rel, target in self.moved.items()]
        lines += [f"resized {rel}: {change}" for rel, change in self.resized.items()]
        if self.metadata_backup is not None:
            lines.append(f"rewrote the metadata without the moved images; the old one is {self.metadata_backup}")
        return "\n".join(lines) if lines else "nothing to fix"


def fix_dataset(index: ImageIndex, report: Report, rejected_dir: Path | None = None, max_side: int | None = None) -> FixSummary:
    """Apply the safe fixes for `report` (from check_image_dataset on `index`).

    Moves unreadable files and exact duplicates (keeping the first) with their caption files to
    `rejected_dir` (default `train_data_dir/rejected/`, relative paths preserved), removes their rows
    from metadata.csv (rewritten atomically, the old file kept as metadata.csv.bak), and shrinks
    images whose longest side exceeds `max_side` in place after copying the original to
    `rejected_dir/originals/`.
    """
    rejected_dir = rejected_dir or index.root / REJECTED_FOLDER
    summary = FixSummary()
    records = {record.rel: record for record in index.records}
    moved_paths: set[Path] = set()
    for check in MOVED_CHECKS:
        finding = report.finding(check)
        for rel in finding.items if finding else []:
            record = records.pop(rel, None)
            if record is None:
                continue
            relative = record.path.relative_to(index.root)
            moved_paths.add(record.path)
            summary.moved[rel] = _move(record.path, rejected_dir / relative)
            caption_file = record.path.with_suffix(index.caption_extension)
            if index.metadata_path is None and caption_file.is_file():
                _move(caption_file, rejected_dir / relative.with_suffix(index.caption_extension))
    if moved_paths and index.metadata_path is not None:
        summary.metadata_backup = _drop_metadata_rows(index.root, index.metadata_path, moved_paths)
    if max_side is not None:
        for record in records.values():
            change = _shrink(record.path, max_side, rejected_dir / "originals" / record.path.relative_to(index.root))
            if change:
                summary.resized[record.rel] = change
    return summary


def _free_path(path: Path) -> Path:
    """`path`, or `name.1.ext`, `name.2.ext`, ... if taken (an earlier fix may have used it)."""
    candidate, number = path, 0
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.stem}.{number}{path.suffix}")
    return candidate


def _move(source: Path, target: Path) -> Path:
    target = _free_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
    return target


def _drop_metadata_rows(root: Path, metadata_path: Path, moved_paths: set[Path]) -> Path:
    """Rewrite `metadata_path` without the rows naming moved images; return the backup's path."""
    table = read_metadata_table(metadata_path)
    column = table.file_column
    kept = [table.rows[0]] + [
        row for row in table.rows[1:]
        if column >= len(row) or normalized_row_path(root, row[column].strip()) not in moved_paths
    ]
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(kept)
    backup = _free_path(metadata_path.with_name(metadata_path.name + ".bak"))
    shutil.copy2(metadata_path, backup)
    write_bytes_atomically(metadata_path, (b"\xef\xbb\xbf" if table.has_bom else b"") + buffer.getvalue().encode("utf-8"))
    return backup


def _shrink(path: Path, max_side: int, original_copy: Path) -> str | None:
    """Resize `path` in place so its longest side is `max_side`; keep the original at `original_copy`."""
    with Image.open(path) as image:
        if max(image.size) <= max_side:
            return None
        image_format, before = image.format, image.size
        save_options = {"icc_profile": image.info["icc_profile"]} if "icc_profile" in image.info else {}
        if image_format in ("JPEG", "WEBP"):
            save_options["quality"] = 95
        resized = ImageOps.exif_transpose(image)  # the saved copy drops EXIF, so apply its rotation now
        resized.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    target = _free_path(original_copy)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
    write_atomically(path.parent, lambda tmp: resized.save(tmp / path.name, format=image_format, **save_options))
    return f"{before[0]}x{before[1]} -> {resized.width}x{resized.height} (original in {target})"
