"""`lora-scripts export --to gguf`: a trained text LoRA (PEFT folder) as a llama.cpp GGUF adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_scripts.errors import UserError

# gguf_adapter.OUTTYPES' keys, spelled out so that building the parser imports no gguf / torch
OUTTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")

EPILOG = """examples:
  lora-scripts export --to gguf --adapter output/medical_lora --base models/qwen2.5-0.5b-f16.gguf
  lora-scripts export --to gguf --config configs/my_lora.yaml --outtype q8_0

The adapter's tensors are named after the base GGUF's, so --base must be the .gguf the adapter
will run on (make one from a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py).
The default output is ADAPTER/<adapter folder name>-<outtype>.gguf, beside the PEFT files."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts export`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--to", required=True, choices=["gguf"], help="target format: gguf (a llama.cpp LoRA adapter)")
    parser.add_argument("--adapter", type=Path, help="PEFT adapter folder (default: the config's output_dir)")
    parser.add_argument("--base", type=Path, help="base model .gguf the adapter runs on (default: the config's base_model)")
    parser.add_argument("--config", type=Path, help="training config YAML; supplies base_model and output_dir")
    parser.add_argument("--out", type=Path, help="adapter file to write (default: ADAPTER/<name>-<outtype>.gguf); never overwritten")
    parser.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f16", help="tensor type (default f16; q8_0 rows that are not whole blocks stay f16)")


def sources(base: Path | str | None, lora: Path | None, config: Path | None, base_flag: str, lora_flag: str) -> tuple[str, Path]:
    """The base model and LoRA named on the command line, or else by the config's
    `base_model` and `output_dir`. Raises UserError when either stays unknown."""
    if config is not None and (base is None or lora is None):
        from lora_scripts.config import load_config

        cfg = load_config(config)
        base = base if base is not None else cfg.base_model
        lora = lora if lora is not None else cfg.output_dir
    missing = [flag for flag, value in ((base_flag, base), (lora_flag, lora)) if value is None]
    if missing:
        raise UserError(f"pass {' and '.join(missing)} (or --config CONFIG.yaml, whose base_model / output_dir fill them)")
    if not Path(lora).exists():
        raise UserError(f"{lora_flag} {lora}: not found")
    return str(base), Path(lora)


def run(args: argparse.Namespace) -> int:
    """Write the GGUF adapter and print how to run it; returns the exit code."""
    from lora_scripts.export.gguf_adapter import default_adapter_path, export_gguf_adapter, gguf_adapter_usage

    base, adapter = sources(args.base, args.adapter, args.config, "--base", "--adapter")
    out = args.out or default_adapter_path(adapter, args.outtype)
    export_gguf_adapter(adapter, Path(base), out, args.outtype)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype}), a llama.cpp LoRA adapter for {base}")
    print(gguf_adapter_usage(out, Path(base), adapter))
    return 0
