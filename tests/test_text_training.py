"""End to end: the CLI trains a tiny Llama; the output is a PEFT adapter that changes the model."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import REPO, run_cli, text_config


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_cli_trains_adapter_that_peft_loads(tmp_path, tiny_llm_dir):
    config = text_config(tmp_path, tiny_llm_dir, epochs=2, save_steps=4, validation_split=0.1)
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.yaml", "loss_curve.png", "logs"} <= names
    # 22 train samples / 4 per step = 6 steps per epoch, 12 in all: checkpoints at 4, 8, 12
    assert sorted(p.name for p in out.glob("step_*")) == ["step_12", "step_4", "step_8"]
    assert "22 train / 2 validation" in proc.stdout

    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    before = _logits(base, ids)
    tuned = PeftModel.from_pretrained(base, str(out))
    after = _logits(tuned, ids)
    assert (after - before).abs().max() > 1e-3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the final adapter equals the last checkpoint's
    final = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "step_12" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_tensorboard_holds_loss_and_eval_loss(tmp_path, tiny_llm_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = text_config(tmp_path, tiny_llm_dir, validation_split=0.2, eval_steps=2)
    assert run_cli("train", "--config", str(config)).returncode == 0
    events = EventAccumulator(str(tmp_path / "out" / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "eval/loss"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 5 and all(0 < v < 20 for v in losses)


def test_overrides_and_generate(tmp_path, tiny_llm_dir):
    config = text_config(tmp_path, tiny_llm_dir)
    proc = run_cli("train", "--config", str(config), "--set", "lora_rank=8", "--set", "max_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8
    assert "done: 2 steps" in proc.stdout
    gen = run_cli("generate", "--config", str(config), "--prompt", "1 加 1 等于几？", "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith(">>> 1 加 1 等于几？\n") and len(gen.stdout.splitlines()) >= 2


def test_incremental_training_starts_from_existing_lora(tmp_path, tiny_llm_dir):
    first = text_config(tmp_path, tiny_llm_dir, max_steps=3)
    assert run_cli("train", "--config", str(first)).returncode == 0
    (tmp_path / "second").mkdir()
    second = text_config(tmp_path / "second", tiny_llm_dir, max_steps=1, learning_rate=1e-12,
                         init_lora_weights=str(tmp_path / "out"))
    proc = run_cli("train", "--config", str(second))
    assert proc.returncode == 0, proc.stderr
    a = load_file(tmp_path / "out" / "adapter_model.safetensors")
    b = load_file(tmp_path / "second" / "out" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)

    (tmp_path / "from_file").mkdir()
    from_file = text_config(tmp_path / "from_file", tiny_llm_dir, max_steps=1, learning_rate=1e-12,
                            init_lora_weights=str(tmp_path / "out" / "adapter_model.safetensors"))
    proc = run_cli("train", "--config", str(from_file))
    assert proc.returncode == 0, proc.stderr
    c = load_file(tmp_path / "from_file" / "out" / "adapter_model.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-6

    wrong = text_config(tmp_path / "second", tiny_llm_dir, lora_rank=8, output_dir=str(tmp_path / "third"),
                        init_lora_weights=str(tmp_path / "out"))
    proc = run_cli("train", "--config", str(wrong))
    assert proc.returncode == 2
    assert "rank 4 differs from lora_rank 8" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_smollm2_gguf_trains_a_few_steps(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs/examples/smollm2_json.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    proc = run_cli("train", "--config", str(config), "--set", f"output_dir={tmp_path / 'out'}", "--set", "max_steps=2",
                   "--set", "batch_size=2", "--set", "save_steps=1", "--set", "validation_file=null", "--set", "export=[gguf]")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "step_2" / "adapter_model.safetensors").is_file()
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert len(weights) == 30 * 7 * 2  # 30 blocks x 7 linear layers x (A, B)
    # `export: [gguf]`: the llama.cpp adapter beside the PEFT files, and how to use it
    reader = GGUFReader(tmp_path / "out" / "out.gguf")
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == len(weights)
    assert "llama-cli -m" in proc.stdout and "--lora" in proc.stdout


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_llm_dir):
    outputs = {}
    for flag in (False, True):
        folder = tmp_path / str(flag)
        folder.mkdir()
        config = text_config(folder, tiny_llm_dir, max_steps=2, gradient_checkpointing=flag)
        proc = run_cli("train", "--config", str(config))
        assert proc.returncode == 0, proc.stderr
        outputs[flag] = load_file(folder / "out" / "adapter_model.safetensors")
    plain, checkpointed = outputs[False], outputs[True]
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) < 1e-6
    assert any(plain[k].abs().max() > 0 for k in plain if "lora_B" in k)
