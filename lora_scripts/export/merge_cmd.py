"""`lora-scripts merge`: bake a LoRA into its base model at a strength.

What the LoRA is decides the path:
- a PEFT folder (`adapter_config.json`): a text LoRA, merged by `merge_text.py` into a Hugging
  Face folder (`--to hf`) or, with a .gguf base, into a GGUF model (`--to gguf`);
- anything else (a kohya / A1111 `.safetensors` file, a diffusers LoRA): an image LoRA, merged by
  `lora_scripts.export.merge_image.merge_image_lora(base: Path, lora: Path, out: Path,
  strength: float, out_format: str) -> Path`, where out_format is "single_file" (an original-
  layout SD checkpoint for WebUI / ComfyUI) or "diffusers" (a diffusers pipeline folder).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lora_scripts.errors import UserError
from lora_scripts.export.export_cmd import sources

TEXT_TARGETS = ("hf", "gguf")
IMAGE_TARGETS = {"single-file": "single_file", "diffusers": "diffusers"}
EPILOG = """examples:
  lora-scripts merge --base models/Qwen2.5-0.5B-Instruct --lora output/medical_lora --out merged/qwen-medical
  lora-scripts merge --base smollm2.Q4_1.gguf --lora output/smollm2_json --to gguf --outtype q8_0 --out smollm2-json.gguf
  lora-scripts merge --base v1-5-pruned.safetensors --lora output/my_style_lora/my_style_lora.safetensors --strength 0.8 --out merged.safetensors

--to defaults to: text: gguf when --out ends in .gguf, else hf; image: the base's layout (a
single-file checkpoint -> single-file, a diffusers folder -> diffusers).
A GGUF merge keeps the base's metadata and tokenizer; Ollama loads it with `FROM ./merged.gguf`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts merge`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--base", help="base model: HF folder or .gguf (text); .safetensors checkpoint or diffusers folder (image) (default: the config's base_model)")
    parser.add_argument("--lora", type=Path, help="the LoRA: PEFT adapter folder (text) or kohya/diffusers LoRA (image) (default: the config's output_dir)")
    parser.add_argument("--out", type=Path, required=True, help="merged model to write; never overwritten")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength, as <lora:name:0.8> (default 1.0)")
    parser.add_argument("--to", choices=[*TEXT_TARGETS, *IMAGE_TARGETS], help="output format (default: see below)")
    parser.add_argument("--outtype", choices=["f16", "q8_0"], help="--to gguf: type of the merged tensors (default f16)")
    parser.add_argument("--config", type=Path, help="training config YAML; supplies base_model and output_dir")


def run(args: argparse.Namespace) -> int:
    """Merge and say how to use the result; returns the exit code."""
    if not math.isfinite(args.strength):
        raise UserError(f"--strength {args.strength}: must be a finite number")
    base, lora = sources(args.base, args.lora, args.config, "--base", "--lora")
    if (lora / "adapter_config.json").is_file():
        return _merge_text(base, lora, args)
    if Path(base).suffix == ".gguf" or (Path(base) / "config.json").is_file():
        raise UserError(f"--lora {lora}: not a PEFT adapter folder (no adapter_config.json); a text base model takes the folder training wrote")
    target = args.to or ("single-file" if Path(base).is_file() else "diffusers")  # the base's own layout
    if target not in IMAGE_TARGETS:
        raise UserError(f"--to {target}: an image LoRA merges into {' or '.join(IMAGE_TARGETS)}")
    if args.outtype is not None:
        raise UserError("--outtype applies to text merges with --to gguf only")
    # --- image LoRA: lora_scripts/export/merge_image.py (kohya / diffusers LoRA into an SD checkpoint)
    from lora_scripts.export.merge_image import merge_image_lora

    out = merge_image_lora(Path(base), lora, args.out, args.strength, IMAGE_TARGETS[target])
    print(f"wrote {out}: {base} with {lora} merged at strength {args.strength:g}")
    return 0


def _merge_text(base: str, lora: Path, args: argparse.Namespace) -> int:
    from lora_scripts.export.merge_text import merge_text_to_gguf, merge_text_to_hf

    target = args.to or ("gguf" if args.out.suffix == ".gguf" else "hf")
    if target not in TEXT_TARGETS:
        raise UserError(f"--to {target}: a text LoRA (PEFT folder) merges into hf or gguf")
    if target == "hf":
        if args.outtype is not None:
            raise UserError("--outtype applies to --to gguf; an HF merge is saved in the base model's dtype")
        out = merge_text_to_hf(base, lora, args.out, args.strength)
        print(f"wrote {out}: {base} with {lora} merged at strength {args.strength:g}")
        print(f"load it with AutoModelForCausalLM.from_pretrained(\"{out}\"); for llama.cpp / Ollama convert it with "
              "llama.cpp's convert_hf_to_gguf.py, or merge into a .gguf base with --to gguf")
        return 0
    out = merge_text_to_gguf(Path(base), lora, args.out, args.strength, args.outtype or "f16")
    print(f"wrote {out}: {base} with {lora} merged at strength {args.strength:g}")
    print(f"run it: llama-cli -m {out}   |   Ollama: a Modelfile with `FROM ./{out.name}`, then `ollama create NAME -f Modelfile`")
    return 0
