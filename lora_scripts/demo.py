"""The embedded demo: SmolLM2-135M learns to extract one JSON object from short records.

Scores the base model on the held-out split, trains the LoRA from
`configs/examples/smollm2_json.yaml`, scores again, and prints the before/after table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_scripts.config import load_config
from lora_scripts.data.text_files import read_rows
from lora_scripts.errors import UserError
from lora_scripts.eval.json_fields import JsonScore, format_table, score_json_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "examples" / "smollm2_json.yaml"
MAX_NEW_TOKENS = 128


def score_adapter(cfg, adapter_dir: Path | None) -> tuple[JsonScore, list[str]]:
    """Greedy answers of the base model (+ adapter) on the held-out split, scored per field."""
    from lora_scripts.tasks.text_infer import generate_texts, load_with_adapter
    from lora_scripts.tasks.text_data import make_sample_builder

    rows = read_rows(cfg.validation_file)
    model, tokenizer = load_with_adapter(cfg, adapter_dir)
    builder = make_sample_builder(cfg, tokenizer, rows)
    prompts = [builder.prompt_text(row["messages"][0]["content"]) for row, _ in rows]
    references = [json.loads(row["messages"][1]["content"]) for row, _ in rows]
    outputs = generate_texts(model, tokenizer, prompts, MAX_NEW_TOKENS, add_special_tokens=False, batch_size=16)
    return score_json_outputs(outputs, references), outputs


def run_demo(output_dir: Path, overrides: list[str]) -> int:
    """Score the base model, train, score the trained LoRA, print both."""
    from lora_scripts.loop import train

    if not DEMO_CONFIG.is_file():
        raise UserError(f"demo config missing: {DEMO_CONFIG}; run the demo from a lora-scripts checkout")
    os.chdir(REPO_ROOT)
    cfg = load_config(DEMO_CONFIG, [f"output_dir={output_dir}", "resume=true", *overrides])
    print(f"[1/3] scoring the base model on {cfg.validation_file} …", flush=True)
    before, _ = score_adapter(cfg, None)
    print(f"[2/3] training ({DEMO_CONFIG.relative_to(REPO_ROOT)}) …", flush=True)
    result = train(cfg, resume_hint="lora-scripts demo")
    if result.status != "done":
        return 0
    print("[3/3] scoring base model + LoRA …", flush=True)
    after, outputs = score_adapter(cfg, cfg.output_dir)
    table = format_table(before, after)
    print(table)
    report = {"before": before.__dict__, "after": after.__dict__, "outputs_after": outputs}
    (cfg.output_dir / "demo_scores.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"LoRA: {cfg.output_dir} (load with peft.PeftModel.from_pretrained); scores: {cfg.output_dir / 'demo_scores.json'}")
    return 0
