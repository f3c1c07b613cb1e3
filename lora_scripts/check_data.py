"""`lora-scripts check-data`: run the dataset doctor on a config's data, before any GPU hour."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.tasks import get_task


def build_check_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The check-data options (after --config/--set)."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    parser.add_argument("--html", type=Path, metavar="PATH", help="also write an HTML report with thumbnails")
    parser.add_argument("--embeddings", type=Path, metavar="NPZ", help="CLIP embeddings from `lora-scripts label --embeddings-out` (style outliers)")
    parser.add_argument("--fix", action="store_true", help="move duplicates and unreadable files to rejected/, shrink oversized images")
    parser.add_argument("--max-side", type=int, default=2048, help="with --fix: shrink images whose longest side is larger")
    return parser


def run_check_data(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Print the report (table or JSON), write HTML/fixes if asked; exit 1 when something blocks."""
    checked = get_task(cfg.task_type).data_report(cfg, args.embeddings)
    if args.fix and checked.fix is None:
        raise UserError("--fix applies to image folders; edit text data files by hand")
    report = checked.report
    print(json.dumps(report.to_json(), ensure_ascii=False, indent=1, default=str) if args.json else report.format_terminal())
    if args.html:
        report.write_html(args.html)
        if not args.json:
            print(f"HTML report: {args.html}")
    if args.fix:
        print(checked.fix(args.max_side).format_terminal())
    return 1 if report.has_blocking else 0
