"""`lora-scripts merge` of a text LoRA into a Hugging Face folder, and the mistakes it refuses.

The merged folder is loaded with `AutoModelForCausalLM.from_pretrained` and must equal the base
plus the LoRA at that strength, as PEFT computes it, in float32. (The GGUF merge and the merge
of a GGUF base are checked on the real SmolLM2 in test_export_gguf.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.forkserver import ForkServer
from tests.helpers import assert_refused_cleanly, snapshot, write_config
from tests.tiny_llm import SMOLLM2_GGUF

STRENGTH = 0.6


def make_adapter(model_dir, out, seed: int = 0, **lora_keys):
    """A PEFT adapter on the model in `model_dir` with random (non-zero) lora_B, saved to `out`."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    keys = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, LoraConfig(**{**keys, **lora_keys}))
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: a merge of that would prove nothing
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One warmed-up CLI process, forked per command."""
    server = ForkServer(["lora_scripts.export.merge_cmd", "lora_scripts.export.merge_text", "peft"], tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def adapter(tiny_llm_dir, tmp_path_factory):
    """rsLoRA with per-module rank and alpha: the merge must apply PEFT's scale per module."""
    return make_adapter(tiny_llm_dir, tmp_path_factory.mktemp("lora") / "adapter", use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})


@torch.no_grad()
def test_hf_merge_equals_base_plus_lora_at_strength(server, tiny_llm_dir, adapter, tmp_path):
    out = tmp_path / "merged"
    result = server.run("merge", "--base", str(tiny_llm_dir), "--lora", str(adapter), "--out", str(out), "--strength", str(STRENGTH))
    assert result.returncode == 0, result.stderr
    assert "from_pretrained" in result.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert (out / "tokenizer.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    expected_weights = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            path = name.removeprefix("base_model.model.")
            expected_weights[path] = module.base_layer.weight + STRENGTH * module.scaling["default"] * delta
            module.scale_layer(STRENGTH)
    assert len(expected_weights) == 2 * 7
    merged_modules = dict(merged.named_modules())
    for path, expected in expected_weights.items():
        torch.testing.assert_close(merged_modules[path].weight, expected, rtol=0, atol=1e-5)

    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    with peft_model.disable_adapter():  # the LoRA moved the logits well beyond that tolerance
        assert (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() > 1e-2


def test_merge_sources_from_config(server, tiny_llm_dir, adapter, tmp_path):
    config = write_config(tmp_path / "config.yaml", base_model=tiny_llm_dir, output_dir=adapter, train_data_dir=tmp_path)
    out = tmp_path / "merged"
    result = server.run("merge", "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.fixture(scope="module")
def bad_adapters(tiny_llm_dir, tmp_path_factory):
    """Adapters the merge must refuse: DoRA (for --to gguf), and one for a wider model."""
    root = tmp_path_factory.mktemp("bad")
    wide = root / "wide_llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(wide))
    return {
        "dora": make_adapter(tiny_llm_dir, root / "dora", use_dora=True),
        "wide": make_adapter(wide, root / "wide_adapter"),
    }


def merge_cases(tiny_llm_dir, adapter, bad, tmp_path):
    """(name, argv, expected text in the error line) for each refused merge."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    hf = ["merge", "--base", str(tiny_llm_dir)]
    return [
        ("output exists", [*hf, "--lora", str(adapter), "--out", str(existing)], "already exists"),
        ("adapter for another base", [*hf, "--lora", str(bad["wide"]), "--out", str(tmp_path / "a")], "does not fit base"),
        ("gguf merge onto an HF folder", [*hf, "--lora", str(adapter), "--to", "gguf", "--out", str(tmp_path / "b.gguf")], "convert_hf_to_gguf.py"),
        ("DoRA into a GGUF", ["merge", "--base", str(SMOLLM2_GGUF), "--lora", str(bad["dora"]), "--out", str(tmp_path / "c.gguf")], "DoRA"),
        ("tiny adapter into SmolLM2", ["merge", "--base", str(SMOLLM2_GGUF), "--lora", str(adapter), "--out", str(tmp_path / "d.gguf")], "trained for another model"),
        ("outtype on an HF merge", [*hf, "--lora", str(adapter), "--outtype", "q8_0", "--out", str(tmp_path / "e")], "--outtype"),
        ("missing lora", [*hf, "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "f")], "not found"),
        ("image LoRA file on a text base", [*hf, "--lora", str(adapter / "adapter_model.safetensors"), "--out", str(tmp_path / "g")], "not a PEFT adapter folder"),
    ]


def test_bad_merges_fail_with_one_line_and_write_nothing(server, tiny_llm_dir, adapter, bad_adapters, tmp_path):
    cases = merge_cases(tiny_llm_dir, adapter, bad_adapters, tmp_path)
    before = snapshot(tmp_path)
    results = server.run_many([argv for _, argv, _ in cases], parallel=2)
    assert_refused_cleanly(results, cases, tmp_path, before)
