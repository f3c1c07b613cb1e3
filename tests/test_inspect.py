"""`lora-scripts inspect`: on real files from the kohya/diffusers exporters, PEFT and the GGUF
exporter, `--json` states the facts the file itself holds (ranks, alphas, module counts, family,
method, hashes) and which runtimes load it; bad input is one `error:` line, exit 2."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.forkserver import ForkServer
from tests.lora_fixtures import TEXT_TARGETS, make_image_loras, make_peft_adapter
from tests.tiny_llm import SMOLLM2_GGUF
from tests.tiny_sd import single_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`lora-scripts` runs, forked from one process that has imported the inspect code."""
    server = ForkServer(["lora_scripts.export.lora_info"], tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image_loras(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def text(tmp_path_factory, tiny_llm_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    return {
        "plain": make_peft_adapter(tiny_llm_dir, folder / "plain", r=12, lora_alpha=24),
        "dora": make_peft_adapter(tiny_llm_dir, folder / "dora", r=8, lora_alpha=8, use_dora=True, use_rslora=True),
    }


def inspect_json(cli: ForkServer, path: Path) -> dict:
    result = cli.run("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def groups(info: dict) -> dict[str, dict]:
    return {group["name"]: group for group in info["groups"]}


def test_kohya_file(cli, image):
    info = inspect_json(cli, image.kohya_a)
    with safe_open(image.kohya_a, "pt") as handle:
        metadata = handle.metadata()
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    assert (info["format"], info["kind"], info["family"], info["family_source"]) == ("kohya", "image", "sd1", "ss_base_model_version")
    assert info["method"] == "locon"  # the ResNet 3x3 convs carry LoRA
    unet, te = groups(info)["unet"], groups(info)["te"]
    assert (unet["modules"], unet["ranks"], unet["alphas"], unet["conv3x3_modules"]) == (image.layer_counts["unet"], [4], [8.0], image.layer_counts["conv3x3"])
    assert (te["modules"], te["ranks"], te["alphas"], te["conv3x3_modules"]) == (image.layer_counts["te"], [2], [3.0], 0)
    assert info["module_count"] == sum(key.endswith(".lora_down.weight") for key in shapes) == unet["modules"] + te["modules"]
    assert info["targets"]["attn2_to_k"] == 6 and info["targets"]["conv1"] == 12 and info["targets"]["self_attn_q_proj"] == 2
    assert info["parameters"] == sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(".alpha"))
    assert info["size_bytes"] == image.kohya_a.stat().st_size and info["dtypes"] == ["float32"]
    assert info["training"]["steps"] == 120 and info["training"]["epoch"] == 3 and info["training"]["resolution"] == "64x64"
    assert info["hashes"]["sha256"] == hashlib.sha256(image.kohya_a.read_bytes()).hexdigest()
    assert info["hashes"]["addnet"] == metadata["sshs_model_hash"] and info["hashes"]["sshs_model_hash_matches"] is True
    assert {name: v["ok"] for name, v in info["runs_in"].items()} == {"a1111": True, "comfyui": True, "diffusers": True}


def test_diffusers_folder(cli, image):
    info = inspect_json(cli, image.diffusers_a)
    assert (info["format"], info["method"]) == ("diffusers", "locon")
    unet, te = groups(info)["unet"], groups(info)["te"]
    # alphas come from the LoraConfig diffusers stored in the file's lora_adapter_metadata
    assert (unet["modules"], unet["ranks"], unet["alphas"]) == (image.layer_counts["unet"], [4], [8.0])
    assert (te["modules"], te["ranks"], te["alphas"]) == (image.layer_counts["te"], [2], [3.0])
    runs = info["runs_in"]
    assert runs["diffusers"]["ok"] and not runs["a1111"]["ok"] and "kohya" in runs["a1111"]["why"]
    attention = sum(count for name, count in info["targets"].items() if ".to_" in name)
    assert not runs["comfyui"]["ok"] and f"{attention} attention module(s)" in runs["comfyui"]["why"]


def test_peft_adapter(cli, text, tiny_llm_dir):
    info = inspect_json(cli, text["plain"])
    assert (info["format"], info["kind"], info["family"], info["base_model"], info["method"]) == ("peft", "text", "llama", str(tiny_llm_dir), "lora")
    assert sorted(groups(info)) == sorted(TEXT_TARGETS) and info["module_count"] == 2 * len(TEXT_TARGETS)
    assert all(g["ranks"] == [12] and g["alphas"] == [24.0] and g["modules"] == 2 for g in info["groups"])
    runs = info["runs_in"]
    assert runs["peft"]["ok"]
    # vLLM loads any rank up to --max-lora-rank, which takes 1/8/16/32/…: rank 12 fits the default 16
    assert runs["vllm"]["ok"] and "--max-lora-rank 16" in runs["vllm"]["why"]
    assert not runs["llama.cpp"]["ok"] and "lora-scripts export --to gguf" in runs["llama.cpp"]["why"]
    # the same adapter named by its weights file
    assert inspect_json(cli, text["plain"] / "adapter_model.safetensors")["groups"] == info["groups"]


def test_dora_rslora_adapter(cli, text):
    info = inspect_json(cli, text["dora"])
    assert info["method"] == "dora+rslora"
    runs = info["runs_in"]
    assert runs["peft"]["ok"]
    assert not runs["vllm"]["ok"] and "DoRA" in runs["vllm"]["why"]
    assert not runs["llama.cpp"]["ok"] and "DoRA" in runs["llama.cpp"]["why"]


def test_gguf_adapter_from_the_exporter(cli, tmp_path):
    # a one-layer Llama shaped like SmolLM2 (576 wide, 9 heads, 3 KV heads), so the exporter can
    # name its tensors after the shipped SmolLM2 GGUF's
    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "smol1")
    adapter = make_peft_adapter(tmp_path / "smol1", tmp_path / "adapter", r=8, lora_alpha=16)
    exported = cli.run("export", "--to", "gguf", "--adapter", str(adapter), "--base", str(SMOLLM2_GGUF), "--out", str(tmp_path / "a.gguf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    info = inspect_json(cli, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert (info["format"], info["family"], info["method"]) == ("gguf", reader.fields["general.architecture"].contents(), "lora")
    assert info["module_count"] == sum(t.name.endswith(".lora_a") for t in reader.tensors) == len(TEXT_TARGETS)
    assert set(groups(info)) == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"}
    assert all(g["ranks"] == [8] and g["alphas"] == [alpha] for g in info["groups"])
    assert info["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    runs = info["runs_in"]
    assert runs["llama.cpp"]["ok"] and "--lora a.gguf" in runs["llama.cpp"]["why"]
    assert not runs["vllm"]["ok"] and not runs["peft"]["ok"]


@pytest.mark.parametrize("case, expect", [
    ("unknown_layout", "unknown LoRA layout"),
    ("truncated", "not a readable .safetensors file"),
    ("text_file", "unknown LoRA file type '.txt'"),
])
def test_bad_input_is_one_error_line(cli, image, tmp_path, case, expect):
    path = {"unknown_layout": tmp_path / "model.safetensors", "truncated": tmp_path / "cut.safetensors",
            "text_file": tmp_path / "notes.txt"}[case]
    if case == "unknown_layout":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, path)
    elif case == "truncated":
        path.write_bytes(image.kohya_a.read_bytes()[:5000])
    else:
        path.write_text("hello\n")
    result = cli.run("inspect", str(path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expect in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
