"""The options of `lora-scripts label` / `tools/auto_label.py` (cheap to import: no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "Caption a training folder with CLIP zero-shot labels (metadata.csv and/or .txt sidecars)."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_label_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the auto-labelling options to `parser` (a top-level parser or a subcommand's)."""
    parser.add_argument(
        "--input", type=Path, required=True, metavar="DIR", help="image folder; kohya N_name subfolders are included"
    )
    parser.add_argument("--output", type=Path, metavar="CSV", help="metadata.csv to write (columns filename,prompt)")
    parser.add_argument("--sidecars", action="store_true", help="also write a .txt caption next to each image")
    parser.add_argument(
        "--model", type=Path, default=Path("models/clip"), metavar="DIR",
        help="local transformers CLIP folder (default models/clip)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels (one category)")
    source.add_argument("--labels-file", type=Path, metavar="FILE", help="one candidate label per line")
    source.add_argument(
        "--categories", type=Path, metavar="FILE", help="YAML/JSON mapping category -> labels; one pick per category"
    )
    parser.add_argument("--trigger", metavar="WORD", help="put first in every caption, e.g. a LoRA trigger token")
    parser.add_argument("--top-k", type=_positive_int, default=1, metavar="K", help="labels kept per category (1)")
    parser.add_argument(
        "--threshold", type=_probability, default=0.0, metavar="P",
        help="drop labels whose softmax probability within their category is below P; "
        "the best label is still kept unless --threshold-strict",
    )
    parser.add_argument("--threshold-strict", action="store_true", help="let --threshold drop every label")
    parser.add_argument("--overwrite", action="store_true", help="replace captions that already exist")
    parser.add_argument(
        "--embeddings-out", type=Path, metavar="NPZ", help="write unit CLIP image embeddings keyed by relative path"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per CLIP pass (16)")
    parser.add_argument("--device", default="auto", help="torch device: auto (default), cpu, cuda, cuda:1 …")
    return parser
