"""Subcommands that move a finished LoRA to where it runs: export, merge, convert, resize, inspect.

Each command lives in its own module under `lora_scripts/export/` with two functions:
`add_arguments(parser)` and `run(args) -> int` (the exit code). The CLI imports a module only
when its command runs, or when the parser is built for `--help`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# command name -> (one-line help, module holding add_arguments/run)
EXPORT_COMMANDS: dict[str, tuple[str, str]] = {}


def add_export_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register every export command on the CLI (`add(name, help=…)` makes a subparser)."""
    for name, (help_text, module_name) in EXPORT_COMMANDS.items():
        importlib.import_module(module_name).add_arguments(add(name, help=help_text, description=help_text))


def run_export_command(args: argparse.Namespace) -> int:
    """Run the export command named by `args.command`; returns the exit code."""
    _, module_name = EXPORT_COMMANDS[args.command]
    return importlib.import_module(module_name).run(args)
