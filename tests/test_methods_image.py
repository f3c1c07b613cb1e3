"""The image LoRA methods, trained through the CLI on the tiny SD1: LoCon (kohya's conv set),
LoHa and LoKr (LyCORIS key layout), LoRA+. Each file's weight deltas, recomputed by A1111's /
LyCORIS' formulas and merged into the original-layout checkpoint under A1111's module names, give
the trained model's outputs; diffusers loads LoCon itself; ComfyUI finds every key; a killed and
resumed run ends bit-identical; incremental training, generate, samples, check-data and inspect
know each method; SDXL LoCon/LoKr names resolve in A1111 and ComfyUI.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_scripts.config import load_config, validate_config
from lora_scripts.export.kohya import peft_to_kohya_state_dict
from lora_scripts.export.lora_info import describe
from lora_scripts.models.sd import load_sd_components
from lora_scripts.tasks.image_model import attach_adapters
from tests.forkserver import ForkServer
from tests.image_helpers import image_config, max_change, trained_model, write_dataset
from tests.test_image_training import pipeline_outputs
from tests.test_kohya_format import a1111_find_module, a1111_layer_mapping, comfy_key_map, outputs
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

# lora_alpha != lora_rank and conv_alpha != conv_dim, so a wrong alpha / rank shows
METHODS = {
    "locon": dict(conv_dim=8, conv_alpha=2, lora_alpha=2, train_text_encoder=True),
    "loha": dict(network_type="loha", conv_dim=4, lora_alpha=2),
    "lokr": dict(network_type="lokr", conv_dim=4, conv_alpha=8, lora_alpha=2, train_text_encoder=True),
    "loraplus": dict(loraplus_lr_ratio=4),
}
# 4 images, micro-batches of 1, 2 per step: 2 steps per epoch, 4 in all, a checkpoint every 2
COMMON = dict(batch_size=1, gradient_accumulation_steps=2, max_steps=4, save_steps=2, learning_rate=5e-3, output_name="style")
# A1111 extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis: its ResNet suffix_conversion
# and sampler rules (SD1/SD2 names; SDXL names are SGM ones already)
A1111_RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
# the tensor sets A1111's module types (network_lora/hada/lokr.py) and ComfyUI's weight adapters accept
KEY_SETS = [{"lora_down.weight", "lora_up.weight", "alpha"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}]
DIFFERENCES: dict[str, float] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny"), "sd1")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork = ForkServer(["lora_scripts.tasks.image"], tmp_path_factory.mktemp("fork"))
    yield fork
    fork.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny, server):
    """Per method: an uninterrupted run, and one SIGKILLed after step 3 then resumed."""
    root = tmp_path_factory.mktemp("methods")
    configs = {}
    for name, keys in METHODS.items():
        for kind in ("straight", "crashed"):
            folder = root / name / kind
            write_dataset(folder / "data", [(32, 32)] * 4)
            extra = dict(sample_prompts=["ink wash painting, cat --w 32 --h 32"], sample_steps=2) if (name, kind) == ("loha", "straight") else {}
            configs[name, kind] = image_config(folder, tiny.diffusers_dir, **COMMON, **keys, **extra)
        server.train_ok(configs[name, "straight"])
        server.train_ok(configs[name, "crashed"], fault="kill_after_step:3")
        server.train_ok(configs[name, "crashed"], "resume=true")
    yield configs
    print("\nA1111-merged file vs trained model, largest output difference:",
          ", ".join(f"{k}: {v:.2g}" for k, v in DIFFERENCES.items()))


def lora_file(config) -> dict[str, torch.Tensor]:
    return load_file(config.parent / "out" / "style.safetensors")


def a1111_module(name: str, layer_mapping: set[str]) -> str | None:
    """The LDM module A1111 applies a kohya module to (None: "Failed to match keys")."""
    key = name
    if m := re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_resnets_(\d+)_(.+)", name):
        block = 1 + int(m[2]) * 3 + int(m[3]) if m[1] == "down" else int(m[2]) * 3 + int(m[3])
        key = f"diffusion_model_{'input' if m[1] == 'down' else 'output'}_blocks_{block}_0_{A1111_RESNET_SUFFIXES[m[4]]}"
    elif m := re.fullmatch(r"lora_unet_mid_block_resnets_(\d+)_(.+)", name):
        key = f"diffusion_model_middle_block_{int(m[1]) * 2}_{A1111_RESNET_SUFFIXES[m[2]]}"
    elif m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        key = f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    elif m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        key = f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    return key if key in layer_mapping else a1111_find_module(name, layer_mapping)


def a1111_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A module's weight update as A1111 computes it (network_lora/hada/lokr.py, network.py
    calc_scale: alpha / dim, dim = lora_down / hada_w1_b / LoKr _b rank; a LoKr of two full factors: 1)."""
    t = {key: value.double() for key, value in tensors.items()}
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        dim, updown = down.shape[0], up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    elif "hada_w1_a" in t:
        dim, updown = t["hada_w1_b"].shape[0], (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        factor = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        dim = None if factor is None else factor.shape[0]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2)
    scale = float(t["alpha"]) / dim if dim is not None else 1.0
    return (updown * scale).reshape(shape)


def merge_like_a1111(checkpoint: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with every LoRA module's A1111 delta added to the weight A1111 maps it to."""
    layer_mapping = a1111_layer_mapping(set(checkpoint))
    by_module: dict[str, str] = {}
    for key in checkpoint:  # A1111 module name (dots as underscores, without model./cond_stage_model.) -> key
        parts = key.split(".")[:-1]
        by_module["_".join(parts[1:] if parts[0] in ("model", "cond_stage_model") else parts)] = key
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = value
    merged = dict(checkpoint)
    for name, tensors in modules.items():
        assert set(tensors) in KEY_SETS or {re.sub(r"_[ab]$", "", s) for s in tensors} == {"lokr_w1", "lokr_w2", "alpha"}, (name, sorted(tensors))
        target = a1111_module(name, layer_mapping)
        assert target is not None, f"A1111: Failed to match keys: {name}"
        weight_key = by_module[target]
        merged[weight_key] = (merged[weight_key].double() + a1111_delta(tensors, merged[weight_key].shape)).float()
    return merged


@pytest.mark.parametrize("method", list(METHODS))
def test_a1111_formulas_on_the_file_give_the_trained_outputs(method, runs, tiny, tmp_path):
    config = runs[method, "straight"]
    lora = lora_file(config)
    checkpoint = load_file(tiny.single_file)
    merged_file = tmp_path / "merged.safetensors"
    save_file(merge_like_a1111(checkpoint, lora), merged_file)
    merged = load_sd_components(merged_file, "sd1", config_dir=tiny.config_dir)
    trained = trained_model(load_config(config), config.parent / "out" / "step_4")
    expected = outputs(trained.unet, list(trained.text_encoders), "sd1")
    got = outputs(merged.unet, merged.text_encoders, "sd1")
    DIFFERENCES[method] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    base = load_sd_components(tiny.diffusers_dir)
    changed = max_change(expected, outputs(base.unet, base.text_encoders, "sd1"))
    assert min(changed if METHODS[method].get("train_text_encoder") else changed[:1]) > 1e-3

    comfy = comfy_key_map(base.unet.config, [list(encoder.state_dict()) for encoder in base.text_encoders])
    modules = {key.split(".", 1)[0] for key in lora}
    assert sorted(modules - comfy.keys()) == []  # ComfyUI: no "lora key not loaded"
    conv_set = [name for name in modules if re.search(r"resnets_\d+_conv1$|upsamplers|downsamplers", name)]
    assert len(conv_set) == (14 if "conv_dim" in METHODS[method] else 0)  # 12 ResNet blocks' conv1 + 2 samplers


def test_locon_loads_in_diffusers_with_the_trained_outputs(runs, tiny):
    config = runs["locon", "straight"]
    trained = trained_model(load_config(config), config.parent / "out" / "step_4")
    expected = outputs(trained.unet, list(trained.text_encoders), "sd1")
    for got, want in zip(pipeline_outputs(tiny.diffusers_dir, "sd1", config.parent / "out" / "style.safetensors"), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    shapes = {key: value.shape for key, value in lora_file(config).items()}
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (8, 32, 3, 3)  # conv_dim
    assert shapes["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"] == (4, 128)  # lora_rank


@pytest.mark.parametrize("method", list(METHODS))
def test_a_killed_run_resumed_ends_bit_identical(method, runs):
    want, got = lora_file(runs[method, "straight"]), lora_file(runs[method, "crashed"])
    assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want)
    halfway = load_file(runs[method, "crashed"].parent / "out" / "step_2" / "style_step_2.safetensors")
    assert not all(torch.equal(halfway[key], got[key]) for key in got)


@pytest.mark.parametrize(("method", "module", "args", "kind", "diffusers_ok"), [
    ("locon", "networks.lora", {"conv_dim": "8", "conv_alpha": "2"}, "locon", True),
    ("loha", "lycoris.kohya", {"algo": "loha", "conv_dim": "4", "conv_alpha": "4"}, "loha", False),
    ("lokr", "lycoris.kohya", {"algo": "lokr", "conv_dim": "4", "conv_alpha": "8"}, "lokr", False),
    ("loraplus", "networks.lora", {"loraplus_lr_ratio": "4"}, "lora", True),
])
def test_metadata_and_inspect_name_each_method(method, module, args, kind, diffusers_ok, runs):
    path = runs[method, "straight"].parent / "out" / "style.safetensors"
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])) == (module, args)
    info = describe(path)
    assert info["method"] == kind
    assert {name: verdict["ok"] for name, verdict in info["runs_in"].items()} == {"a1111": True, "comfyui": True, "diffusers": diffusers_ok}


def test_loraplus_groups_and_samples_with_loha(runs):
    state = torch.load(runs["loraplus", "straight"].parent / "out" / "step_4" / "optimizer.pt", weights_only=True)
    assert [group["initial_lr"] for group in state["optimizer"]["param_groups"]] == [5e-3, 2e-2]
    assert sorted(p.name for p in (runs["loha", "straight"].parent / "out" / "samples").iterdir())  # sample grids rendered


def test_incremental_training_generate_and_check_data(runs, tiny, server, tmp_path):
    for method in ("locon", "lokr"):
        source = runs[method, "straight"].parent / "out" / "style.safetensors"
        folder = tmp_path / method
        write_dataset(folder / "data", [(32, 32)] * 2)
        config = image_config(folder, tiny.diffusers_dir, **{**METHODS[method], **COMMON, "max_steps": 1, "learning_rate": 1e-12},
                              init_lora_weights=str(source))
        server.train_ok(config)
        before, after = load_file(source), load_file(folder / "out" / "style.safetensors")
        assert before.keys() == after.keys() and max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    wrong = image_config(tmp_path / "locon", tiny.diffusers_dir, "wrong.yaml", output_dir=str(tmp_path / "wrong"), network_type="loha",
                         init_lora_weights=str(runs["locon", "straight"].parent / "out" / "style.safetensors"))
    proc = server.run("train", "--config", str(wrong))
    assert proc.returncode == 2 and "a lora file; set network_type: lora" in proc.stderr

    for method in ("loha", "lokr"):  # files diffusers cannot load: generate builds the run's layers itself
        proc = server.run("generate", "--config", str(runs[method, "straight"]), "--prompt", "ink wash painting, cat --w 32 --h 32", "--steps", "2")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().endswith(".png")
    proc = server.run("check-data", "--config", str(runs["lokr", "straight"]))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("network_type", ["lora", "lokr"])
def test_sdxl_conv_set_names_resolve_in_a1111_and_comfyui(network_type, tmp_path):
    tiny = make_tiny_sd(tmp_path, "sdxl")
    components = load_sd_components(tiny.diffusers_dir)
    comfy = comfy_key_map(components.unet.config, [list(encoder.state_dict()) for encoder in components.text_encoders])
    cfg = validate_config(dict(base_model=str(tiny.diffusers_dir), train_data_dir="d", output_dir="o", lora_rank=4,
                               conv_dim=4, network_type=network_type))
    unet_modules, _ = attach_adapters(components.unet, components.text_encoders, cfg)
    names = {key.split(".", 1)[0] for key in peft_to_kohya_state_dict(components.unet, components.text_encoders, "sdxl")}
    assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names  # SGM sampler names
    assert "lora_unet_input_blocks_4_0_skip_connection" in names and "lora_unet_middle_block_2_emb_layers_1" in names
    with safe_open(tiny.single_file, framework="pt") as handle:
        layer_mapping = a1111_layer_mapping(set(handle.keys()))
    assert len(names) == unet_modules + 24 and sorted(n for n in names if a1111_find_module(n, layer_mapping) is None) == []
    assert sorted(names - comfy.keys()) == []
