"""`lora-scripts` command line: train, generate, config, demo.

A mistake the user can fix is printed as one `error:` line with exit code 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lora_scripts.errors import UserError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lora_rank=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from lora_scripts.check_data import build_check_parser
    from lora_scripts.commands import add_commands
    from lora_scripts.labeling.args import DESCRIPTION as LABEL_DESCRIPTION, build_label_parser
    from lora_scripts.launch import add_launch_arguments

    parser = argparse.ArgumentParser(prog="lora-scripts", description="Config-driven LoRA training for Stable Diffusion and LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731

    train = add("train", help="train a LoRA from a YAML config")
    _add_config_args(train)
    add_launch_arguments(train)

    generate = add("generate", help="generate with the base model plus the trained LoRA")
    _add_config_args(generate)
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    generate.add_argument("--adapter", type=Path, help="adapter folder (default: output_dir)")
    generate.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength, as <lora:name:0.8>")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--steps", type=int, help="image: sampler steps (default: sample_steps)")
    generate.add_argument("--seed", type=int, help="image: seed of the first prompt (default: seed)")
    generate.add_argument("--out-dir", type=Path, help="image: where the PNGs go (default: output_dir/generated)")

    config = add("config", help="show the config reference or check a config")
    group = config.add_mutually_exclusive_group(required=True)
    group.add_argument("--schema", action="store_true", help="print every config key as a Markdown table")
    group.add_argument("--check", type=Path, metavar="YAML", help="validate a config file and print it resolved")

    check = add("check-data", help="check a config's training data and say why a LoRA would fail")
    _add_config_args(check)
    build_check_parser(check)

    build_label_parser(add("label", help="caption images with CLIP zero-shot labels", description=LABEL_DESCRIPTION))

    add_commands(add)

    demo = add("demo", help="train the embedded SmolLM2 JSON-extraction example and show before/after scores")
    demo.add_argument("--output-dir", type=Path, default=Path("output/smollm2_json"))
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; returns the exit code."""
    from lora_scripts.config import load_config, schema_markdown

    if args.command == "config":
        if args.schema:
            print(schema_markdown(), end="")
            return 0
        import yaml

        print(yaml.safe_dump(load_config(args.check).model_dump(mode="json"), allow_unicode=True, sort_keys=False), end="")
        return 0
    if args.command == "label":
        from lora_scripts.label import run_label

        return run_label(args)
    from lora_scripts.commands import COMMANDS, run_command

    if args.command in COMMANDS:
        return run_command(args)
    if args.command == "demo":
        from lora_scripts.demo import run_demo

        return run_demo(args.output_dir, args.overrides)
    cfg = load_config(args.config, args.overrides)
    if args.command == "check-data":
        from lora_scripts.check_data import run_check_data

        return run_check_data(cfg, args)
    if args.command == "train":
        from lora_scripts.launch import LAUNCH_FLAGS_ENV, launch, plan_launch, process_rank

        sets = "".join(f" --set {o}" for o in args.overrides)
        topology = plan_launch(args, cfg)
        if topology is not None:  # start the ranks, each running this command without the launch flags
            sets_argv = [arg for override in args.overrides for arg in ("--set", override)]
            return launch(topology, ["train", "--config", str(args.config), *sets_argv, *(["--debug"] if args.debug else [])])
        from lora_scripts.loop import train

        hint = f"lora-scripts train --config {args.config} --set resume=true{sets}{os.environ.get(LAUNCH_FLAGS_ENV, '')}"
        result = train(cfg, resume_hint=hint)
        if result.status == "done" and process_rank() == 0:
            print(f"done: {result.step} steps; LoRA written to {result.output_dir}")
        return 0
    if args.command == "generate":
        from lora_scripts.tasks import get_task
        from lora_scripts.tasks.base import GenerateRequest

        request = GenerateRequest(args.prompt, args.adapter or cfg.output_dir, args.lora_scale, args.max_new_tokens,
                                  args.steps, args.seed, args.out_dir)
        for line in get_task(cfg.task_type).generate(cfg, request):
            print(line)
        return 0
    raise AssertionError(args.command)


def quiet_libraries() -> None:
    """Hide the libraries' progress bars and deprecation chatter; our own output stays."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch|peft|accelerate|transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lora-scripts` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        quiet_libraries()
    try:
        return run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
