"""`lora-scripts resize --lora IN --rank N --out OUT [--dynamic-energy E] [--per-module]`.

Re-factorises every module of a kohya file or PEFT adapter folder by SVD to rank N (or, with
`--dynamic-energy`, to the smallest rank per module keeping that share of sum S^2, at most N),
writes the same format to OUT, and prints the retained energy: min and mean over modules and the
modules that lost most (all modules with `--per-module`). Resizing to the LoRA's own rank or
above is lossless. Logic in `lora_scripts/export/resize.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts resize`."""
    parser.add_argument("--lora", type=Path, required=True, help="kohya .safetensors or PEFT adapter folder")
    parser.add_argument("--rank", type=int, required=True, help="new rank (the maximum with --dynamic-energy)")
    parser.add_argument("--out", type=Path, required=True, help="output file (kohya) or folder (PEFT); must not exist")
    parser.add_argument("--dynamic-energy", type=float, metavar="E",
                        help="per module, the smallest rank keeping share E of sum S^2 (kohya's sv_fro P is E = P^2)")
    parser.add_argument("--per-module", action="store_true", help="print every module's new rank and retained energy")


def run(args: argparse.Namespace) -> int:
    """Resize and report; UserError for bad input (nothing is written then)."""
    from lora_scripts.export.resize import energy_summary, resize_lora

    reports = resize_lora(args.lora, args.out, args.rank, args.dynamic_energy)
    lines = energy_summary(reports, worst=0 if args.per_module else 5)
    if args.per_module:
        lines += [f"  {r.name}  rank {r.old_rank} -> {r.new_rank}  energy {r.energy:.6f}" for r in reports]
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0
