"""`lora-scripts inspect FILE_OR_DIR [--json]`: what a LoRA is and which runtimes can load it.

Reads kohya/A1111 `.safetensors`, diffusers `pytorch_lora_weights.safetensors`, PEFT adapter
folders (or their `adapter_model.safetensors`) and GGUF LoRA adapters. Only headers are read,
plus kohya's 0-d alphas; the weights are hashed, never loaded.

`--json` prints one object with these keys (stable; new keys may be added):
- `path`, `weights_file`: what was given, and the file holding the tensors.
- `format`: "kohya" | "diffusers" | "peft" | "gguf"; `kind`: "image" | "text".
- `family`: sd1 | sd2 | sd2_v | sdxl for images; the base's model_type (PEFT, when the base
  folder is on this machine) or `general.architecture` (GGUF) for text; null when unknown.
  `family_source` says how it was told; `base_model` names the base when the file does.
- `method`: lora | locon | loha | lokr (or PEFT's peft_type, lower case), then "+dora",
  "+rslora" where they apply; a plain "lora" is dropped before them ("dora+rslora").
- `module_count`; `groups`: list of {name (unet/te/te1/te2, or the text target such as q_proj),
  modules, ranks (distinct, sorted), alphas (distinct, sorted; [] when the file stores none),
  conv3x3_modules}; `targets`: {layer name without its block path: module count}.
- `dtypes` (distinct tensor dtypes), `size_bytes` (weights file), `parameters` (adapter elements).
- `training`: kohya ss_* facts (steps, epoch, epochs, learning_rate, resolution "WxH", …) or the
  lora-scripts training_config.yaml keys beside a PEFT adapter; {} when none.
- `hashes`: {sha256 (whole file), addnet (A1111/kohya: sha256 after the safetensors header; null
  for GGUF), sshs_model_hash, sshs_legacy_hash (as stored, or null), sshs_model_hash_matches}.
- `runs_in`: {runtime: {ok: bool, why: str}} for a1111, comfyui, diffusers (images) or peft,
  vllm, llama.cpp (text); `why` is the command to use, or the reason it cannot load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNTIME_NAMES = {"a1111": "A1111", "comfyui": "ComfyUI", "diffusers": "diffusers", "peft": "PEFT",
                 "vllm": "vLLM", "llama.cpp": "llama.cpp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts inspect`."""
    parser.add_argument("path", type=Path, metavar="FILE_OR_DIR", help="LoRA file or adapter folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in the module docstring)")


def run(args: argparse.Namespace) -> int:
    """Print the description of one LoRA; UserError for input that is not one."""
    from lora_scripts.export.lora_info import describe  # heavy (torch, diffusers): only when run

    info = describe(args.path)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else "\n".join(table(info)))
    return 0


def table(info: dict) -> list[str]:
    """The human-readable form: one aligned `label  value` line per fact."""
    rows = [
        ("path", info["path"]),
        ("format", f"{info['format']} ({info['kind']} LoRA)"),
        ("family", f"{info['family'] or 'unknown'} ({info['family_source']})"
                   + (f", base {info['base_model']}" if info["base_model"] else "")),
        ("method", info["method"]),
        ("modules", f"{info['module_count']} (" + ", ".join(f"{g['name']} {g['modules']}" for g in info["groups"]) + ")"),
    ]
    for group in info["groups"]:
        alphas = "/".join(f"{a:g}" for a in group["alphas"]) or "none (= rank)"
        conv = f", {group['conv3x3_modules']} conv 3x3" if group["conv3x3_modules"] else ""
        rows.append(("  " + group["name"], f"rank {'/'.join(map(str, group['ranks']))}, alpha {alphas}{conv}"))
    rows += [
        ("targets", ", ".join(f"{name} {count}" for name, count in info["targets"].items())),
        ("dtype", ", ".join(info["dtypes"])),
        ("size", f"{info['size_bytes'] / 2**20:.2f} MiB ({info['size_bytes']:,} bytes), {info['parameters']:,} parameters"),
    ]
    if info["training"]:
        rows.append(("training", ", ".join(f"{key} {value}" for key, value in info["training"].items())))
    hashes = info["hashes"]
    rows.append(("sha256", hashes["sha256"]))
    if hashes["addnet"]:
        match = {True: " (= sshs_model_hash)", False: " (sshs_model_hash differs: tensors changed after saving)", None: ""}
        rows.append(("addnet hash", hashes["addnet"] + match[hashes["sshs_model_hash_matches"]]))
    for name, verdict in info["runs_in"].items():
        rows.append((f"{RUNTIME_NAMES[name]}", f"{'yes' if verdict['ok'] else 'no '}  {verdict['why']}"))
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]
