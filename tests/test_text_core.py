"""Loss masking, gradient accumulation and exact resume on the tiny Llama."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from lora_scripts.config import load_config
from lora_scripts.data.text_files import read_rows
from lora_scripts.data.text_samples import IGNORE_INDEX, build_samples
from lora_scripts.loop import backward_group
from lora_scripts.schedule import StepPlan, shuffled_batches
from lora_scripts.tasks.text import build_text_task, make_sample_builder
from lora_scripts.models.llm import load_llm
from tests.helpers import run_cli, text_config


def _decode_targets(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


def test_prompt_tokens_carry_no_loss_template(tmp_path, tiny_llm_dir):
    cfg = load_config(text_config(tmp_path, tiny_llm_dir))
    _, tokenizer = load_llm(str(tiny_llm_dir))
    rows = read_rows(cfg.train_data_dir)
    samples, stats = build_samples(rows, make_sample_builder(cfg, tokenizer, rows))
    first = samples[0]
    assert tokenizer.decode(first.input_ids) == "问：0 加 0 等于几？\n答：0 加 0 等于 0。" + tokenizer.eos_token
    assert _decode_targets(tokenizer, first) == "0 加 0 等于 0。" + tokenizer.eos_token
    prompt_len = len(tokenizer("问：0 加 0 等于几？\n答：")["input_ids"])
    assert all(label == IGNORE_INDEX for label in first.labels[:prompt_len])
    assert first.labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert stats.truncated == []


def test_chat_messages_mask_everything_but_assistant_turns(tmp_path, tiny_llm_dir):
    data = tmp_path / "chat.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "See you."}]
    data.write_text(json.dumps({"messages": conversation}) + "\n", encoding="utf-8")
    cfg = load_config(text_config(tmp_path, tiny_llm_dir, train_data_dir=str(data), prompt_template=None))
    _, tokenizer = load_llm(str(tiny_llm_dir))
    rows = read_rows(data)
    (sample,), _ = build_samples(rows, make_sample_builder(cfg, tokenizer, rows))
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert _decode_targets(tokenizer, sample) == "Hello!<|im_end|>\nSee you.<|im_end|>\n"


def test_truncation_is_counted(tmp_path, tiny_llm_dir):
    config = text_config(tmp_path, tiny_llm_dir, max_seq_length=40, max_steps=1)
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "24 rows, 14 cut to max_seq_length=40 (first: " in proc.stdout
    proc = run_cli("train", "--config", str(config), "--set", "max_seq_length=10", "--set", f"output_dir={tmp_path / 'o2'}")
    assert proc.returncode == 2 and "all 24 rows lost their response to max_seq_length=10" in proc.stderr


def _grads(task, groups):
    accelerator = Accelerator(cpu=True)
    task.model.zero_grad()
    loss, units = backward_group(task.model, task, [task.collate([task.train_set[i] for i in g]) for g in groups], accelerator)
    return loss, units, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad}


def test_accumulation_2x2_equals_batch_4(tmp_path, tiny_llm_dir):
    cfg = load_config(text_config(tmp_path, tiny_llm_dir, lora_dropout=0.0))
    task = build_text_task(cfg, "cpu")
    with torch.no_grad():  # non-zero B so every LoRA weight gets a gradient
        for name, param in task.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    # samples of very different lengths, so per-micro-batch averaging would be wrong
    idx = [0, 13, 5, 22]
    assert len({len(task.train_set[i].input_ids) for i in idx}) > 1
    loss_big, units_big, grads_big = _grads(task, [idx])
    loss_acc, units_acc, grads_acc = _grads(task, [idx[:2], idx[2:]])
    assert units_big == units_acc
    assert abs(loss_big - loss_acc) < 1e-5
    assert max((grads_big[n] - grads_acc[n]).abs().max().item() for n in grads_big) < 1e-5
    assert max(g.abs().max().item() for g in grads_big.values()) > 1e-4


def test_step_plan_groups_cover_each_epoch_once():
    plan = StepPlan(shuffled_batches(10, 2, seed=1), accumulation=2, epochs=2, max_steps=None)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 6
    first_epoch = [i for step in range(3) for mb in plan.micro_batches(step) for i in mb]
    assert sorted(first_epoch) == list(range(10))
    assert plan.micro_batches(2) == [first_epoch[8:10]]
    second_epoch = [i for step in range(3, 6) for mb in plan.micro_batches(step) for i in mb]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch


def test_resume_continues_exactly(tmp_path, tiny_llm_dir):
    keys = dict(lr_scheduler="constant", lora_dropout=0.1, gradient_accumulation_steps=2, batch_size=2, epochs=2, save_steps=2)
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    assert run_cli("train", "--config", str(text_config(full_dir, tiny_llm_dir, **keys))).returncode == 0

    part_dir = tmp_path / "part"
    part_dir.mkdir()
    config = text_config(part_dir, tiny_llm_dir, **keys)
    proc = run_cli("train", "--config", str(config), "--set", "max_steps=5")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", "--config", str(config), "--set", "resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_5" in proc.stdout
    assert "max_steps: 5 -> None" in proc.stdout

    full = load_file(full_dir / "out" / "adapter_model.safetensors")
    resumed = load_file(part_dir / "out" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resume must be bit-exact on CPU"


def test_resume_refuses_breaking_change(tmp_path, tiny_llm_dir):
    config = text_config(tmp_path, tiny_llm_dir, max_steps=2, save_steps=1)
    assert run_cli("train", "--config", str(config)).returncode == 0
    proc = run_cli("train", "--config", str(config), "--set", "resume=true", "--set", "lora_rank=8")
    assert proc.returncode == 2
    assert "the config changed (" in proc.stderr and "lora_rank: 4 -> 8)" in proc.stderr
    (tmp_path / "qa.jsonl").write_text('{"question": "x", "answer": "y"}\n', encoding="utf-8")
    proc = run_cli("train", "--config", str(config), "--set", "resume=true")
    assert proc.returncode == 2 and "the data changed" in proc.stderr


def test_a_checkpoint_from_before_fused_lora_resumes(tmp_path, tiny_llm_dir):
    config = text_config(tmp_path, tiny_llm_dir, max_steps=2, save_steps=1)
    assert run_cli("train", "--config", str(config), "--set", "max_steps=1").returncode == 0
    states = list((tmp_path / "out").rglob("trainer_state.json"))
    assert states
    for state in states:  # as an older version wrote it, before `fused_lora` existed
        meta = json.loads(state.read_text(encoding="utf-8"))
        del meta["config"]["fused_lora"]
        state.write_text(json.dumps(meta), encoding="utf-8")
    proc = run_cli("train", "--config", str(config), "--set", "resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    assert "resume: allowed config changes: fused_lora: None -> True, max_steps: 1 -> 2" in proc.stdout
