"""The embedded demo: SmolLM2-135M learns to extract one JSON object from short records.

Scores the base model on both held-out splits of `data/json_extract/` (familiar: the training
set's vocabularies and templates, new records; novel: names, items, cities and wording training
never shows), trains the LoRA from `configs/examples/smollm2_json.yaml`, scores again, and prints
the before/after tables and the training time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.eval.json_fields import JsonScore, format_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "examples" / "smollm2_json.yaml"
DATA = REPO_ROOT / "data" / "json_extract"
SPLITS = {"familiar": DATA / "heldout.jsonl", "novel": DATA / "novel.jsonl"}


def score_splits(cfg, adapter_dir: Path | None) -> dict[str, tuple[JsonScore, list[str]]]:
    """Greedy answers of the base model (+ adapter) on each held-out split, scored per field."""
    from lora_scripts.eval.evaluate import load_eval_set, score
    from lora_scripts.tasks.text_infer import load_with_adapter

    model, tokenizer = load_with_adapter(cfg, adapter_dir)
    return {name: score(model, tokenizer, load_eval_set(cfg, tokenizer, path)) for name, path in SPLITS.items()}


def run_demo(output_dir: Path, overrides: list[str]) -> int:
    """Score the base model, train, score the trained LoRA, print both."""
    from lora_scripts.loop import train

    if not DEMO_CONFIG.is_file():
        raise UserError(f"demo config missing: {DEMO_CONFIG}; run the demo from a lora-scripts checkout")
    os.chdir(REPO_ROOT)
    cfg = load_config(DEMO_CONFIG, [f"output_dir={output_dir}", "resume=true", *overrides])
    print(f"[1/3] scoring the base model on {', '.join(str(p.relative_to(REPO_ROOT)) for p in SPLITS.values())} …", flush=True)
    before = score_splits(cfg, None)
    print(f"[2/3] training ({DEMO_CONFIG.relative_to(REPO_ROOT)}) …", flush=True)
    started = time.perf_counter()
    result = train(cfg, resume_hint="lora-scripts demo")
    minutes = (time.perf_counter() - started) / 60
    if result.status != "done":
        return 0
    print("[3/3] scoring base model + LoRA …", flush=True)
    after = score_splits(cfg, cfg.output_dir)
    report: dict[str, object] = {"train_minutes": round(minutes, 1)}
    for name, path in SPLITS.items():
        print(f"\n{name} held-out split ({path.relative_to(REPO_ROOT)}):")
        print(format_table(before[name][0], after[name][0]))
        report[name] = {"before": asdict(before[name][0]), "after": asdict(after[name][0]),
                        "outputs_after": after[name][1]}
    (cfg.output_dir / "demo_scores.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"\ntraining took {minutes:.1f} min (this run; a resumed run counts only its own part)")
    print(f"LoRA: {cfg.output_dir} (load with peft.PeftModel.from_pretrained); scores: {cfg.output_dir / 'demo_scores.json'}")
    return 0
