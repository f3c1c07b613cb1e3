"""`lora-scripts export --to gguf` and `merge --to gguf`, checked in llama.cpp itself.

A LoRA trained through the CLI on the real SmolLM2 GGUF (2 steps at a high learning rate, so
it moves the logits a lot) is exported, read back with the `gguf` package, and applied with the
same GGUF base in llama.cpp (llama-cpp-python): its next-token logit shifts must follow PEFT's
shifts on the dequantized model. A second adapter adapts only q and k (rsLoRA, per-module rank
and alpha), where a missing RoPE permutation would show: measured with the permutation left
out, the shift correlation falls from 0.98 to 0.09 (top-1 on the last token: 8/8 to 4/8).

Measured here (8 prompts, all positions, 2 CPU cores): shift correlation 0.991 mean / 0.985 min
(trained), 0.984 / 0.975 (q/k only); top-1 agreement of the LoRA models 0.94-0.95 (trained)
and 0.96 (q/k) over all positions (the two bases alone agree on 0.94: llama.cpp runs Q4_1
with 8-bit activations), 8/8 on the last token. GGUF merge (f16) vs HF merge: logit
correlation 0.99995, top-1 1.00, max logit difference 0.50 (q8_0, measured once: 0.9988, 0.96).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tests.forkserver import ForkServer
from tests.helpers import assert_refused_cleanly, snapshot, text_config
from tests.test_merge_text import make_adapter
from tests.tiny_llm import SMOLLM2_GGUF

PROMPTS = [
    "The capital of France is", "def fibonacci(n):\n    ", "问：3 加 3 等于几？\n答：", "Once upon a time, there was a",
    "The patient reported a mild headache and", "Order #4521: two boxes of", "In 1969, astronauts", "My favourite colour is",
]
N_LAYERS, N_HEAD, N_HEAD_KV = 30, 9, 3  # SmolLM2-135M
MERGE_STRENGTH = 0.7


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def shift_agreement(lora: list, base: list, peft_lora: list, peft_base: list) -> tuple[list[float], float, float]:
    """Per prompt: correlation of the two logit shifts; top-1 agreement of the LoRA models
    over all positions and on the last token."""
    corrs = [correlation(a - b, c - d) for a, b, c, d in zip(lora, base, peft_lora, peft_base)]
    top1 = float(np.mean([(a.argmax(-1) == c.argmax(-1)).mean() for a, c in zip(lora, peft_lora)]))
    last = float(np.mean([a[-1].argmax() == c[-1].argmax() for a, c in zip(lora, peft_lora)]))
    return corrs, top1, last


def llama_logits(model_path, token_ids: list[list[int]], **kwargs) -> list[np.ndarray]:
    """Logits at every position of each prompt, from llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), logits_all=True, n_ctx=128, verbose=False, **kwargs)
    logits = []
    for ids in token_ids:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return logits


@torch.no_grad()
def hf_logits(model, token_ids: list[list[int]]) -> list[np.ndarray]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in token_ids]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One warmed-up CLI process, forked per command."""
    preload = ["lora_scripts.tasks.text", "lora_scripts.export.export_cmd", "lora_scripts.export.merge_cmd", "lora_scripts.export.merge_text"]
    server = ForkServer(preload, tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """(config, adapter folder): a LoRA trained through the CLI on the SmolLM2 GGUF."""
    root = tmp_path_factory.mktemp("trained")
    config = text_config(root, SMOLLM2_GGUF, max_steps=2, batch_size=2, learning_rate="1e-2", lr_scheduler="constant",
                         lora_rank=8, lora_alpha=16, max_seq_length=64)
    result = server.run("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return config, root / "out"


@pytest.fixture(scope="module")
def smol():
    """The SmolLM2 GGUF dequantized by transformers, and the prompts' token ids."""
    from lora_scripts.models.llm import load_llm

    model, tokenizer = load_llm(str(SMOLLM2_GGUF))
    return model.eval(), [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def qk_adapter(smol, tmp_path_factory):
    """q_proj/k_proj only, rsLoRA, k at rank 2 with its own alpha, random B (deterministic)."""
    model, _ = smol
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_rslora=True,
                        rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 3})
    torch.manual_seed(0)  # lora_A's kaiming init draws from the global generator
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    folder = tmp_path_factory.mktemp("qk") / "adapter"
    peft_model.save_pretrained(str(folder))
    peft_model.unload()
    return folder


@pytest.fixture(scope="module")
def peft_runs(smol, trained, qk_adapter):
    """PEFT on the dequantized model: logits of the base and of each adapter, and each adapter's
    layers as PEFT built them: {HF module path: (A, B, scaling)}."""
    model, token_ids = smol
    runs = {"base": hf_logits(model, token_ids)}
    for name, folder in (("trained", trained[1]), ("qk", qk_adapter)):
        peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
        layers = {path.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach().numpy().copy(),
                                                           m.lora_B["default"].weight.detach().numpy().copy(), m.scaling["default"])
                  for path, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
        runs[name] = (hf_logits(peft_model, token_ids), layers)
        if name == "trained":
            for module in peft_model.modules():
                if isinstance(module, LoraLayer):
                    module.scale_layer(MERGE_STRENGTH)
            runs["trained_at_strength"] = hf_logits(peft_model, token_ids)
        peft_model.unload()
    return runs


@pytest.fixture(scope="module")
def llama_base(smol):
    return llama_logits(SMOLLM2_GGUF, smol[1])


def gguf_name(path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight` (llama's names, gguf's tensor map)."""
    layer, _, module = path.removeprefix("model.layers.").partition(".")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{names[module]}.weight"


def unpermuted(lora_b: np.ndarray, name: str) -> np.ndarray:
    """Undo the q/k RoPE permutation with transformers' own GGUF loader code."""
    processor = LlamaTensorProcessor(config={"num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV})
    return processor.process(lora_b, name).weights


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def check_readback(path, layers: dict) -> float:
    """Every tensor is PEFT's A, and B un-permuted times alpha/rank is PEFT's scaled B; returns alpha."""
    fields, tensors = read_gguf(path)
    assert {k: fields[k] for k in ("general.type", "general.architecture", "adapter.type")} == {
        "general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora"}
    alpha = fields["adapter.lora.alpha"]
    assert len(tensors) == 2 * len(layers)
    for path_, (a, b, scaling) in layers.items():
        name = gguf_name(path_)
        lora_a, lora_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"].astype(np.float32)
        assert lora_a.shape == a.shape and lora_b.shape == b.shape  # numpy [r, in] / [out, r]: ggml ne [in, r] / [r, out]
        np.testing.assert_array_equal(lora_a, a.astype(lora_a.dtype))  # PEFT's A, in the file's float type
        # llama.cpp's scale is alpha / rank, rank read from lora_b (llama-adapter.h get_scale)
        np.testing.assert_allclose(alpha / b.shape[1] * unpermuted(lora_b, name), scaling * b, rtol=2e-3, atol=1e-6)
    return alpha


@pytest.mark.slow
def test_export_from_config_reads_back_as_peft_weights(server, trained, peft_runs):
    config, adapter = trained
    result = server.run("export", "--to", "gguf", "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = adapter / "out-f16.gguf"  # the default: beside the PEFT files, named after the folder
    assert f"--lora {out}" in result.stdout and "--lora-scaled" in result.stdout and "merge" in result.stdout and "Ollama" in result.stdout
    layers = peft_runs["trained"][1]
    assert len(layers) == 7 * N_LAYERS
    assert check_readback(out, layers) == 16.0  # lora_alpha: r=8, alpha=16 needs no folding


@pytest.mark.slow
def test_outtypes_q8_0_and_bf16(server, trained, peft_runs, tmp_path):
    adapter = trained[1]
    outs = {outtype: tmp_path / f"{outtype}.gguf" for outtype in ("q8_0", "bf16")}
    results = server.run_many([["export", "--to", "gguf", "--adapter", str(adapter), "--base", str(SMOLLM2_GGUF),
                                "--out", str(out), "--outtype", outtype] for outtype, out in outs.items()], parallel=2)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    a, b, _ = peft_runs["trained"][1]["model.layers.0.mlp.down_proj"]
    for outtype, out in outs.items():
        reader = GGUFReader(str(out))
        tensors = {t.name: t for t in reader.tensors}
        lora_a, lora_b = tensors["blk.0.ffn_down.weight.lora_a"], tensors["blk.0.ffn_down.weight.lora_b"]
        # q8_0 needs rows of 32: lora_a rows (1536 wide) are Q8_0, lora_b rows (rank 8) fall back to F16
        expected = ("Q8_0", "F16") if outtype == "q8_0" else ("BF16", "BF16")
        assert (lora_a.tensor_type.name, lora_b.tensor_type.name) == expected
        for tensor, peft_weight in ((lora_a, a), (lora_b, b)):
            values = dequantize(tensor.data, tensor.tensor_type)
            assert values.shape == peft_weight.shape
            np.testing.assert_allclose(values, peft_weight, rtol=0, atol=np.abs(peft_weight).max() / 100)


@pytest.mark.slow
def test_llama_cpp_shifts_logits_as_peft_does(server, trained, smol, peft_runs, llama_base, tmp_path):
    out = tmp_path / "trained.gguf"
    assert server.run("export", "--to", "gguf", "--adapter", str(trained[1]), "--base", str(SMOLLM2_GGUF), "--out", str(out)).returncode == 0
    lora = llama_logits(SMOLLM2_GGUF, smol[1], lora_path=str(out))
    corrs, top1, last = shift_agreement(lora, llama_base, peft_runs["trained"][0], peft_runs["base"])
    print(f"trained adapter: shift correlation mean {np.mean(corrs):.4f} min {min(corrs):.4f}; top-1 {top1:.3f}, last token {last:.3f}")
    assert min(corrs) > 0.95 and np.mean(corrs) > 0.97
    assert top1 > 0.85 and last >= 7 / 8
    # the LoRA moved the logits far more than the two runtimes differ
    assert np.mean([(a.argmax(-1) != b.argmax(-1)).mean() for a, b in zip(peft_runs["trained"][0], peft_runs["base"])]) > 0.2


@pytest.mark.slow
def test_q_and_k_alone_need_the_rope_permutation(server, qk_adapter, smol, peft_runs, llama_base, tmp_path):
    out = tmp_path / "qk.gguf"
    result = server.run("export", "--to", "gguf", "--adapter", str(qk_adapter), "--base", str(SMOLLM2_GGUF), "--out", str(out), "--outtype", "f32")
    assert result.returncode == 0, result.stderr
    layers = peft_runs["qk"][1]
    alpha = check_readback(out, layers)
    # rsLoRA: q scale 8/sqrt(4) and k scale 3/sqrt(2); one alpha serves q (scale * rank), k is folded into B
    assert alpha == pytest.approx(8 / 2 * 4) or alpha == pytest.approx(3 / 2**0.5 * 2)
    lora = llama_logits(SMOLLM2_GGUF, smol[1], lora_path=str(out))
    corrs, top1, last = shift_agreement(lora, llama_base, peft_runs["qk"][0], peft_runs["base"])
    print(f"q/k adapter: shift correlation mean {np.mean(corrs):.4f} min {min(corrs):.4f}; top-1 {top1:.3f}, last token {last:.3f}")
    assert min(corrs) > 0.9 and np.mean(corrs) > 0.95  # measured 0.975 / 0.984; without the permutation: -0.50 / 0.09
    assert top1 > 0.9 and last >= 7 / 8


@pytest.mark.slow
def test_gguf_merge_agrees_with_hf_merge(server, trained, smol, peft_runs, tmp_path):
    adapter = trained[1]
    common = ["--base", str(SMOLLM2_GGUF), "--lora", str(adapter), "--strength", str(MERGE_STRENGTH)]
    hf_out, gguf_out = tmp_path / "merged", tmp_path / "merged.gguf"
    results = server.run_many([["merge", *common, "--out", str(hf_out)], ["merge", *common, "--out", str(gguf_out)]], parallel=2)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Q4_1" in results[1].stderr and "f16 rounding" in results[1].stderr  # the quantized-base warning

    # the HF merge of a GGUF base: loadable, and PEFT's model at that strength
    merged = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    hf_merged = hf_logits(merged, smol[1])
    hf_diff = max(np.abs(a - b).max() for a, b in zip(hf_merged, peft_runs["trained_at_strength"]))
    print(f"HF merge of the GGUF base vs PEFT at strength {MERGE_STRENGTH}: max |logit diff| {hf_diff:.2e}")
    assert hf_diff < 1e-3

    base_fields, _ = read_gguf(SMOLLM2_GGUF)
    base_types = {t.name: t.tensor_type.name for t in GGUFReader(str(SMOLLM2_GGUF)).tensors}
    adapted = {gguf_name(p) for p in peft_runs["trained"][1]}
    fields, _ = read_gguf(gguf_out)
    assert fields == base_fields  # metadata, tokenizer and chat template kept
    merged_tensors = {t.name: t for t in GGUFReader(str(gguf_out)).tensors}
    assert {name: t.tensor_type.name for name, t in merged_tensors.items()} == {
        name: "F16" if name in adapted else kind for name, kind in base_types.items()}
    for tensor in GGUFReader(str(SMOLLM2_GGUF)).tensors:  # the rest copied byte for byte
        if tensor.name not in adapted:
            assert np.array_equal(merged_tensors[tensor.name].data, tensor.data), tensor.name
    logits = llama_logits(gguf_out, smol[1])
    corrs = [correlation(a, b) for a, b in zip(logits, hf_merged)]
    top1 = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, hf_merged)]))
    max_diff = max(np.abs(a - b).max() for a, b in zip(logits, hf_merged))
    print(f"GGUF merge (f16): logit correlation with the HF merge mean {np.mean(corrs):.5f} min {min(corrs):.5f}; "
          f"top-1 {top1:.3f}; max |logit diff| {max_diff:.2f}")
    assert min(corrs) > 0.9995 and top1 > 0.98  # measured 0.99993, 1.000 (q8_0, not run here: 0.998, 0.96)


@pytest.fixture(scope="module")
def bad_cases(tiny_llm_dir, tmp_path_factory):
    """(name, argv, expected text in the error line) for each refused export, in one folder."""
    root = tmp_path_factory.mktemp("bad_export")
    good = make_adapter(tiny_llm_dir, root / "tiny_adapter")
    dora = make_adapter(tiny_llm_dir, root / "dora", use_dora=True)
    saved = make_adapter(tiny_llm_dir, root / "modules_to_save", modules_to_save=["lm_head"])
    corrupt = root / "corrupt_adapter"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    truncated = root / "truncated.gguf"
    truncated.write_bytes(SMOLLM2_GGUF.read_bytes()[:100_000])
    existing = root / "exists.gguf"
    existing.write_bytes(b"keep me")
    export = ["export", "--to", "gguf", "--base", str(SMOLLM2_GGUF)]
    cases = [
        ("DoRA", [*export, "--adapter", str(dora), "--out", str(root / "a.gguf")], "DoRA"),
        ("modules_to_save", [*export, "--adapter", str(saved), "--out", str(root / "b.gguf")], "modules_to_save"),
        ("adapter for another base", [*export, "--adapter", str(good), "--out", str(root / "c.gguf")], "trained for another model"),
        ("corrupt adapter", [*export, "--adapter", str(corrupt), "--out", str(root / "d.gguf")], "not a readable safetensors"),
        ("output exists", [*export, "--adapter", str(good), "--out", str(existing)], "already exists"),
        ("HF folder as base", ["export", "--to", "gguf", "--base", str(tiny_llm_dir), "--adapter", str(good), "--out", str(root / "e.gguf")], "convert_hf_to_gguf.py"),
        ("truncated base", ["export", "--to", "gguf", "--base", str(truncated), "--adapter", str(good), "--out", str(root / "f.gguf")], "truncated or damaged"),
        ("safetensors as base", ["export", "--to", "gguf", "--base", str(good / "adapter_model.safetensors"), "--adapter", str(good), "--out", str(root / "g.gguf")], "not a GGUF file"),
    ]
    return root, cases


def test_bad_exports_fail_with_one_line_and_write_nothing(server, bad_cases):
    root, cases = bad_cases
    before = snapshot(root)
    results = server.run_many([argv for _, argv, _ in cases], parallel=2)
    assert_refused_cleanly(results, cases, root, before)


def test_cli_outtypes_are_the_exporters():
    from lora_scripts.export.export_cmd import OUTTYPE_CHOICES
    from lora_scripts.export.gguf_adapter import OUTTYPES

    assert OUTTYPE_CHOICES == tuple(OUTTYPES)
