"""`lora-scripts eval` end to end on the tiny Llama: JSON answers scored field by field (the
scorer's rules through the CLI), text records scored by loss and perplexity (checked against a
computation with transformers), bad input refused with one `error:` line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import run_cli, write_config

# The tiny adapter learns to answer every prompt with this: prose around a JSON object whose
# "z" key no reference asks for. Spaced so that no token repeats: the tiny random model then
# learns it as a chain of bigrams in a few dozen steps.
TRAINED_ANSWER = 'Here: {"a":1, "z" :0} ok'


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> tuple[Path, Path]:
    """(config, adapter folder) of a tiny LoRA trained to give TRAINED_ANSWER whatever the prompt."""
    tmp = tmp_path_factory.mktemp("eval_cmd")
    data = write_jsonl(tmp / "train.jsonl", [chat(f"record number {i}", TRAINED_ANSWER) for i in range(8)])
    config = write_config(
        tmp / "config.yaml", task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(data),
        output_dir=str(tmp / "out"), lora_rank=8, lora_alpha=16, batch_size=4, max_steps=80, learning_rate="1e-2",
        save_steps=0, logging_steps=20, seed=0,
    )
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    return config, tmp / "out"


def run_eval(config: Path, data: Path, *extra: str) -> dict:
    proc = run_cli("eval", "--config", str(config), "--data", str(data), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_answers_scored_by_field_with_the_scorers_rules(trained: tuple[Path, Path], tmp_path: Path, tiny_llm_dir: Path) -> None:
    config, adapter = trained
    references = [
        {"a": 1},          # right: the extra "z" of the answer is ignored, the prose around it skipped
        {"a": 1, "z": 0},  # right
        {"a": "1"},        # wrong: the answer's 1 is a number, not the string "1"
        {"a": 1, "b": 2},  # "a" right, "b" missing: not an exact match
    ]
    data = write_jsonl(tmp_path / "records.jsonl",
                       [chat(f"new record {i}", json.dumps(ref)) for i, ref in enumerate(references)])
    report = run_eval(config, data)
    assert report["kind"] == "json" and report["adapter"] == str(adapter)
    assert all(out.startswith(TRAINED_ANSWER) for out in report["outputs_after"]), report["outputs_after"]
    assert report["after"] == {"n": 4, "parse_rate": 1.0, "exact_match": 0.5,
                               "field_accuracy": {"a": 0.75, "z": 1.0, "b": 0.0}}
    # before = the bare base model (random weights): it never writes the answer
    assert report["before"]["n"] == 4 and report["before"]["exact_match"] == 0.0
    assert not any(out.startswith(TRAINED_ANSWER) for out in report["outputs_before"])

    # the same greedy answer as PEFT + transformers give for the prompt as training rendered it
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), str(adapter))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "new record 0"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).startswith(TRAINED_ANSWER)

    # the figures are reproducible: a second run prints the same report
    assert run_eval(config, data) == report


def _mean_token_loss(model, tokenizer, texts: list[str]) -> float:
    """Cross-entropy per token of each text plus EOS (every token after the first is predicted)."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def test_text_records_scored_by_loss_and_perplexity(trained: tuple[Path, Path], tmp_path: Path, tiny_llm_dir: Path) -> None:
    config, adapter = trained
    texts = ["The cat sat on the mat.", "订单：两台笔记本电脑，发往上海。", "Here: a short line", "record number 3 is plain text"]
    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in texts])
    report = run_eval(config, data)
    assert report["kind"] == "text" and "outputs_after" not in report

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    expected_before = _mean_token_loss(base, tokenizer, texts)
    expected_after = _mean_token_loss(PeftModel.from_pretrained(base, str(adapter)), tokenizer, texts)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)  # + EOS - first token, per text
    for side, expected in (("before", expected_before), ("after", expected_after)):
        score = report[side]
        assert score["n"] == 4 and score["tokens"] == tokens
        assert score["loss"] == pytest.approx(expected, rel=1e-4)
        assert score["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert abs(expected_after - expected_before) > 1e-3  # the adapter changed the model

    table = run_cli("eval", "--config", str(config), "--data", str(data))
    assert table.returncode == 0, table.stderr
    assert "4 records (text: loss per target token)" in table.stdout
    assert f"{expected_after:.4f}" in table.stdout and "perplexity" in table.stdout


def test_bad_input_is_one_error_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = trained
    data = write_jsonl(tmp_path / "records.jsonl", [chat("x", '{"a":1}')])
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
        (["--data", str(data), "--adapter", str(tmp_path)], f"no trained adapter in {tmp_path}"),
        (["--data", str(data), "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    ]
    for args, message in cases:
        proc = run_cli("eval", "--config", str(config), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, proc.stderr)
        assert proc.stdout == ""
