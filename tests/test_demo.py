"""`lora-scripts demo` (issue 14): it scores both held-out splits before and after training, and
two runs give the same figures. The real demo trains SmolLM2 for minutes; here the tiny random
Llama (SmolLM2's tokenizer and chat template) stands in for it, trained for two steps."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.helpers import run_cli


def test_the_demo_scores_both_splits_and_two_runs_give_the_same_figures(tmp_path, tiny_llm_dir):
    runs, adapters = [], []
    for name in ("first", "second"):
        out = tmp_path / name
        proc = run_cli("demo", "--output-dir", str(out), "--set", f"base_model={tiny_llm_dir}", "--set", "max_steps=2")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "familiar held-out split (data/json_extract/heldout.jsonl)" in proc.stdout
        assert "novel held-out split (data/json_extract/novel.jsonl)" in proc.stdout
        scores = json.loads((out / "demo_scores.json").read_text(encoding="utf-8"))
        assert scores.pop("train_minutes") >= 0
        runs.append(scores)
        adapters.append(load_file(out / "adapter_model.safetensors"))
    for split in ("familiar", "novel"):
        after = runs[0][split]
        assert len(after["outputs_after"]) == 60
        assert set(after["before"]) == set(after["after"]) and "exact_match" in after["after"]
    assert runs[0] == runs[1]  # every score and every generated answer, before and after
    # the figures come from the same trained weights: two steps moved them, identically in both runs
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert max(t.abs().max().item() for k, t in adapters[0].items() if "lora_B" in k) > 0
