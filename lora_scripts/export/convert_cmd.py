"""`lora-scripts convert --lora IN --to kohya|diffusers --out OUT [--family F] [--base MODEL]`:
move a Stable Diffusion LoRA between kohya's layout (A1111, ComfyUI) and diffusers', losslessly.

The work is in `lora_scripts/export/convert_image.py` (imported when the command runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_scripts.models.sd_detect import SD_FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts convert`."""
    parser.add_argument("--lora", type=Path, required=True, metavar="IN",
                        help="kohya .safetensors, or a diffusers LoRA (pytorch_lora_weights.safetensors or its folder)")
    parser.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="layout to write")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help="kohya: a new .safetensors file; diffusers: a new folder (or a .safetensors file name)")
    parser.add_argument("--family", choices=SD_FAMILIES, help="the LoRA's model family, when the file does not tell")
    parser.add_argument("--base", type=Path, metavar="MODEL", help="the base model the LoRA was trained on (tells the family)")


def run(args: argparse.Namespace) -> int:
    """Convert, print where the result went; 0 on success (errors are UserErrors)."""
    from lora_scripts.export.convert_image import convert_image_lora

    source, written, count = convert_image_lora(args.lora, args.to, args.out, args.family, args.base)
    print(f"wrote {written}: {count} modules, {source.format} -> {args.to}")
    return 0
