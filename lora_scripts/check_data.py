"""`lora-scripts check-data`: run the dataset doctor on a config's data, before any GPU hour."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from typing import TYPE_CHECKING

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError

if TYPE_CHECKING:
    from lora_scripts.datacheck import Report


def build_check_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The check-data options (after --config/--set)."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    parser.add_argument("--html", type=Path, metavar="PATH", help="also write an HTML report with thumbnails")
    parser.add_argument("--embeddings", type=Path, metavar="NPZ", help="CLIP embeddings from `lora-scripts label --embeddings-out` (style outliers)")
    parser.add_argument("--fix", action="store_true", help="move duplicates and unreadable files to rejected/, shrink oversized images")
    parser.add_argument("--max-side", type=int, default=2048, help="with --fix: shrink images whose longest side is larger")
    return parser


def text_report(cfg: TrainConfig) -> Report:
    """Doctor findings for a text task's data (loads the tokenizer only, not the model)."""
    from lora_scripts.data.text_files import read_rows
    from lora_scripts.models.llm import load_tokenizer
    from lora_scripts.tasks.text import make_sample_builder

    rows = read_rows(cfg.train_data_dir)
    builder = make_sample_builder(cfg, load_tokenizer(cfg.base_model), rows)
    validation = read_rows(cfg.validation_file) if cfg.validation_file is not None else []
    return check_text_rows(builder, rows, validation)


def check_text_rows(builder, rows: list, validation_rows: list, token_lengths: list[int] | None = None) -> Report:
    """Doctor findings for text rows as `builder` renders and tokenizes them (`token_lengths`:
    the rows' uncut lengths when already known, else they are tokenized here)."""
    from lora_scripts.data.text_samples import template_fields
    from lora_scripts.datacheck import check_text_samples

    samples = [(*builder.render(row, source), source) for row, source in rows]
    return check_text_samples(
        samples,
        token_lengths=token_lengths or [builder.build(row, source)[1] for row, source in rows],
        max_seq_length=builder.max_seq_length,
        template_fields=template_fields(builder.prompt_template) if builder.data_format == "template" else (),
        raw_rows=[(source, row) for row, source in rows],
        validation_samples=[(*builder.render(row, source), source) for row, source in validation_rows],
    )


def summary_line(report: Report) -> str:
    """One line for the start of training: counts per check, and where to see details."""
    if not report.findings:
        return "data check: no problems found"
    parts = ", ".join(f"{f.check}: {len(f.items) or 1}" for f in report.sorted_findings() if f.severity != "info")
    return f"data check: {parts or 'notes only'} (details: lora-scripts check-data --config …)"


def image_report(cfg: TrainConfig, embeddings_file: Path | None):
    """Doctor findings for an image task's data, plus the index they came from."""
    import numpy as np

    from lora_scripts.data.image_index import index_image_dataset
    from lora_scripts.datacheck import check_image_dataset
    from lora_scripts.models.sd_detect import detect_sd_family
    from lora_scripts.tasks.image import default_resolution

    index = index_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    resolution = cfg.resolution
    if resolution is None:
        family = cfg.model_family or (detect_sd_family(cfg.base_model) if Path(cfg.base_model).exists() else "sd1")
        resolution = default_resolution(family)
    embeddings = None
    if embeddings_file is not None:
        if not embeddings_file.is_file():
            raise UserError(f"--embeddings {embeddings_file}: file not found; write it with `lora-scripts label --input DIR --embeddings-out FILE.npz`")
        with np.load(embeddings_file) as data:
            embeddings = {key: data[key] for key in data.files}
    return check_image_dataset(index, resolution, embeddings=embeddings), index


def run_check_data(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Print the report (table or JSON), write HTML/fixes if asked; exit 1 when something blocks."""
    if cfg.task_type == "text-generation":
        if args.fix:
            raise UserError("--fix applies to image folders; edit text data files by hand")
        report, index = text_report(cfg), None
    else:
        report, index = image_report(cfg, args.embeddings)
    print(json.dumps(report.to_json(), ensure_ascii=False, indent=1, default=str) if args.json else report.format_terminal())
    if args.html:
        report.write_html(args.html)
        if not args.json:
            print(f"HTML report: {args.html}")
    if args.fix and index is not None:
        from lora_scripts.datacheck import fix_dataset

        print(fix_dataset(index, report, max_side=args.max_side).format_terminal())
    return 1 if report.has_blocking else 0
