"""`lora-scripts merge-loras --lora A:0.7 --lora B:0.3 --out C [--rank N]`: several LoRAs into one.

Kohya files or PEFT folders, all of one format and base. Without `--rank` the factors are
stacked (exact; rank = sum of the inputs' ranks); with `--rank N` the summed update is cut to
rank N by SVD and the retained energy is printed. Logic in `lora_scripts/export/merge_loras.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts merge-loras`."""
    parser.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]",
                        help="an input LoRA and its weight (default 1.0); repeat for each")
    parser.add_argument("--out", type=Path, required=True, help="output file (kohya) or folder (PEFT); must not exist")
    parser.add_argument("--rank", type=int, help="SVD-merge to this rank (default: exact concatenation)")


def run(args: argparse.Namespace) -> int:
    """Merge and report; UserError for bad input (nothing is written then)."""
    from lora_scripts.export.merge_loras import merge_loras, parse_lora_arg
    from lora_scripts.export.resize import energy_summary

    reports = merge_loras([parse_lora_arg(text) for text in args.lora], args.out, args.rank)
    if args.rank is None:
        ranks = sorted({r.new_rank for r in reports})
        print(f"concatenated {len(reports)} modules (exact); ranks {'/'.join(map(str, ranks))}")
    else:
        print("\n".join(energy_summary(reports)))
    print(f"wrote {args.out}")
    return 0
