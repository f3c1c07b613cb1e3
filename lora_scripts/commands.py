"""Subcommands that live in a module of their own (export, merge, convert, …, eval, ui).

Each module defines `add_arguments(parser)` and `run(args) -> int` (the exit code). Building the
parser imports every module listed here, so a command module imports only argparse-level things
at the top and its real work (torch, transformers, …) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# command name -> (one-line help, module holding add_arguments/run)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("write a trained text LoRA as a llama.cpp GGUF adapter", "lora_scripts.export.export_cmd"),
    "merge": ("bake a LoRA into its base model at a strength (HF folder, GGUF, SD checkpoint)", "lora_scripts.export.merge_cmd"),
    "inspect": ("show what a LoRA file is and which runtimes can load it", "lora_scripts.export.inspect_cmd"),
    "convert": ("convert an SD LoRA between kohya (A1111/ComfyUI) and diffusers layouts", "lora_scripts.export.convert_cmd"),
    "resize": ("change a LoRA's rank by SVD, printing the energy kept", "lora_scripts.export.resize_cmd"),
    "merge-loras": ("merge several LoRAs into one at given weights", "lora_scripts.export.merge_loras_cmd"),
    "eval": ("score the base model and base + LoRA on your records (JSON fields, or loss/perplexity)", "lora_scripts.eval.eval_cmd"),
    "ui": ("serve the web UI: config form, data doctor, job queue, live runs, compare", "lora_scripts.ui.command"),
}


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register every command listed here on the CLI (`add(name, help=…)` makes a subparser)."""
    for name, (help_text, module_name) in COMMANDS.items():
        importlib.import_module(module_name).add_arguments(add(name, help=help_text, description=help_text))


def run_command(args: argparse.Namespace) -> int:
    """Run the command named by `args.command`; returns the exit code."""
    _, module_name = COMMANDS[args.command]
    return importlib.import_module(module_name).run(args)
