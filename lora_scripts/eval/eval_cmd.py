"""`lora-scripts eval --config X [--adapter DIR] --data FILE [--json]`: the base model, then the
base model + LoRA, scored on your records.

Records are rendered as training renders them (same layout, chat template, prompt template).
If every answer is a JSON object, each prompt is answered greedily and scored: parse rate, exact
match (every reference field right; extra keys ignored) and per-field accuracy (a number written
as a string is wrong). Otherwise: mean loss per target token and perplexity (exp of it).

`--json` prints one object: `data`, `kind` ("json" | "text"), `adapter`, `before`, `after` (the
scores: n, parse_rate, field_accuracy, exact_match; or n, tokens, loss, perplexity) and, for
JSON records, `outputs_before` / `outputs_after` (the raw answers, in record order).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lora-scripts eval`."""
    parser.add_argument("--config", required=True, type=Path, help="the YAML config the LoRA was trained with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: the config's output_dir)")
    parser.add_argument("--data", required=True, type=Path, help="records to score (CSV/JSON/JSONL, training layout)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="answer length limit for JSON records (default: twice the longest reference)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in the module docstring)")


def run(args: argparse.Namespace) -> int:
    """Score base and base + adapter; print a before/after table (or JSON)."""
    from dataclasses import asdict

    from lora_scripts.config import load_config
    from lora_scripts.errors import UserError
    from lora_scripts.eval.evaluate import format_loss_table, load_eval_set, score
    from lora_scripts.eval.json_fields import format_table
    from lora_scripts.models.llm import load_tokenizer
    from lora_scripts.tasks.text_infer import load_with_adapter

    cfg = load_config(args.config, args.overrides)
    adapter = args.adapter or cfg.output_dir
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {adapter} (adapter_config.json missing); train first or pass --adapter FOLDER")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    eval_set = load_eval_set(cfg, load_tokenizer(cfg.base_model), args.data, args.max_new_tokens)  # bad data fails before the model loads
    model, tokenizer = load_with_adapter(cfg, adapter)
    with model.disable_adapter():
        before, outputs_before = score(model, tokenizer, eval_set)
    after, outputs_after = score(model, tokenizer, eval_set)
    if args.json:
        report = {"data": str(args.data), "kind": eval_set.kind, "adapter": str(adapter),
                  "before": asdict(before), "after": asdict(after)}
        if eval_set.kind == "json":
            report |= {"outputs_before": outputs_before, "outputs_after": outputs_after}
        print(json.dumps(report, ensure_ascii=False, indent=1))
        return 0
    what = "JSON answers: fields scored" if eval_set.kind == "json" else "text: loss per target token"
    print(f"{args.data}: {before.n} records ({what}); before = base model, after = base + {adapter}")
    print(format_table(before, after) if eval_set.kind == "json" else format_loss_table(before, after))
    return 0
