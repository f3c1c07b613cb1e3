"""End to end: the spec's config trains a tiny SD1 pipeline; the kohya file diffusers loads gives the
trained model's outputs; single-file checkpoints, text-encoder LoRA and SDXL work too."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.config import load_config
from tests.helpers import REPO, SPEC_BASE_MODEL, SPEC_CONFIG, run_cli
from tests.image_helpers import image_config, max_change, train_in_process, trained_model, write_dataset
from lora_scripts.models.sd import load_sd_components
from tests.test_kohya_format import a1111_find_module, a1111_layer_mapping, comfy_key_map, outputs
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)



PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def kohya_modules(state: dict) -> set[str]:
    return {key.split(".", 1)[0] for key in state}


def assert_a1111_and_comfyui_find_every_module(names: set[str], tiny) -> None:
    """Every kohya module name resolves under A1111's and ComfyUI's rules (as in test_kohya_format)."""
    with safe_open(tiny.single_file, framework="pt") as handle:
        layer_mapping = a1111_layer_mapping(set(handle.keys()))
    assert sorted(name for name in names if a1111_find_module(name, layer_mapping) is None) == []
    base = load_sd_components(tiny.diffusers_dir)
    comfy = comfy_key_map(base.unet.config, [list(encoder.state_dict()) for encoder in base.text_encoders])
    assert sorted(names - comfy.keys()) == []


def pipeline_outputs(model_dir, family: str, lora_file=None) -> list[torch.Tensor]:
    """UNet and text-encoder outputs of a fresh pipeline, after `load_lora_weights(lora_file)` if given."""
    pipe = PIPELINES[family].from_pretrained(model_dir)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return outputs(pipe.unet, encoders, family)


def test_spec_config_verbatim_gives_a_kohya_lora_diffusers_loads(tmp_path):
    tiny = make_tiny_sd(tmp_path / "models", "sd1")
    write_dataset(tmp_path / "data" / "style_train", [(64, 64), (64, 64)])
    config = tmp_path / "configs" / "my_lora_config.yaml"
    config.parent.mkdir()
    config.write_text(SPEC_CONFIG.format(base_model=tiny.diffusers_dir), encoding="utf-8")

    proc = run_cli("train", "--config", "configs/my_lora_config.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output" / "my_style_lora"
    assert {"my_style_lora.safetensors", "step_10", "training_config.yaml", "loss_curve.png", "logs"} <= {p.name for p in out.iterdir()}
    assert "2 images (2 per epoch with repeats) in buckets 64x64: 2" in proc.stdout  # 64 px at resolution 512: not upscaled
    assert "latents: 2 encoded" in proc.stdout

    lora_file = out / "my_style_lora.safetensors"
    state = load_file(lora_file)
    modules = kohya_modules(state)
    assert modules and all(name.startswith("lora_unet_") for name in modules)  # text encoder not trained
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert_a1111_and_comfyui_find_every_module(modules, tiny)
    assert all(float(state[f"{name}.alpha"]) == 8.0 and state[f"{name}.lora_down.weight"].shape[0] == 8 for name in modules)
    with safe_open(lora_file, framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_output_name"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("my_style_lora", "8", "8.0")
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_base_model_version"]) == ("10", "10", "sd_v1")
    assert (meta["ss_learning_rate"], meta["ss_resolution"], meta["modelspec.architecture"]) == ("0.0002", "(512, 512)", "stable-diffusion-v1/lora")
    assert json.loads(meta["ss_tag_frequency"]) == {"style_train": {"ink wash painting": 2, "mountain": 1, "river": 1}}
    raw = lora_file.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    checkpoint_file = load_file(out / "step_10" / "my_style_lora_step_10.safetensors")
    assert all(torch.equal(checkpoint_file[key], state[key]) for key in state)

    cfg = load_config(config)
    model = trained_model(cfg, out / "step_10")
    trained = outputs(model.unet, list(model.text_encoders), "sd1")
    assert max_change(trained, pipeline_outputs(tiny.diffusers_dir, "sd1"))[0] > 1e-3  # training moved the UNet
    loaded = pipeline_outputs(tiny.diffusers_dir, "sd1", lora_file)
    for got, expected in zip(loaded, trained):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_checkpoint_with_text_encoder_lora(tmp_path, family):
    tiny = make_tiny_sd(tmp_path, family)
    write_dataset(tmp_path / "data", [(32, 32), (48, 32), (32, 32), (40, 40)])
    config = image_config(tmp_path, tiny.single_file, model_config_dir=str(tiny.config_dir), train_text_encoder=True,
                          text_encoder_lr=5e-3, save_steps=1, max_steps=2, min_snr_gamma=5.0, noise_offset=0.05,
                          gradient_checkpointing=True, export=["diffusers"])
    train_in_process(config)
    out = tmp_path / "out"
    modules = kohya_modules(load_file(out / "out.safetensors"))
    prefixes = {"lora_unet", "lora_te"} if family == "sd1" else {"lora_unet", "lora_te1", "lora_te2"}
    assert {re.match(r"lora_(unet|te\d?)_", name)[0].rstrip("_") for name in modules} == prefixes
    assert_a1111_and_comfyui_find_every_module(modules, tiny)
    if family == "sdxl":  # kohya names SDXL UNet blocks the original (SGM) way
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    optimizer_state = torch.load(out / "step_2" / "optimizer.pt", weights_only=True)["optimizer"]
    assert [group["lr"] for group in optimizer_state["param_groups"]] == [1e-2, 5e-3]

    model = trained_model(load_config(config), out / "step_2")
    trained = outputs(model.unet, list(model.text_encoders), family)
    assert min(max_change(trained, pipeline_outputs(tiny.diffusers_dir, family))) > 1e-3  # UNet and every text encoder
    loaded = pipeline_outputs(tiny.diffusers_dir, family, out / "out.safetensors")
    for got, expected in zip(loaded, trained):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # `export: [diffusers]` wrote the same LoRA in diffusers' layout beside the kohya file
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    for got, expected in zip(pipeline_outputs(tiny.diffusers_dir, family, out), trained):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_save_format_diffusers_writes_a_folder_diffusers_loads(tmp_path):
    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(32, 32), (32, 32)])
    config = image_config(tmp_path, tiny.diffusers_dir, save_format="diffusers", train_text_encoder=True, max_steps=1, save_steps=1)
    train_in_process(config)
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "out.safetensors").exists()
    assert (out / "step_1" / "pytorch_lora_weights.safetensors").is_file()
    model = trained_model(load_config(config), out / "step_1")
    trained = outputs(model.unet, list(model.text_encoders), "sd1")
    assert min(max_change(trained, pipeline_outputs(tiny.diffusers_dir, "sd1"))) > 1e-3
    for got, expected in zip(pipeline_outputs(tiny.diffusers_dir, "sd1", out), trained):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_example_config_is_the_specs_and_its_optional_keys_are_valid(tmp_path):
    text = (REPO / "configs" / "examples" / "sd15_style.yaml").read_text(encoding="utf-8")
    spec_lines = SPEC_CONFIG.format(base_model=SPEC_BASE_MODEL).splitlines()[1:]
    assert all(line in text.splitlines() for line in spec_lines)
    required, optional = text.split("# --- optional keys")
    uncommented = [line[2:] for line in optional.splitlines()[1:] if line.startswith("# ")]
    config = tmp_path / "all_keys.yaml"
    config.write_text(required + "\n".join(uncommented) + "\n", encoding="utf-8")
    cfg = load_config(config)
    assert len(uncommented) == 21 and cfg.task_type == "image" and cfg.sample_every_n_steps == 100


def test_incremental_training_starts_from_an_earlier_kohya_lora(tmp_path):
    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(32, 32), (32, 32), (32, 32)])
    first = image_config(tmp_path, tiny.diffusers_dir, train_text_encoder=True, max_steps=2)
    train_in_process(first)
    earlier = load_file(tmp_path / "out" / "out.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in earlier.items() if k.endswith("lora_up.weight"))

    second = image_config(tmp_path, tiny.diffusers_dir, name="second.yaml", train_text_encoder=True, max_steps=1,
                          learning_rate=1e-12, output_dir=str(tmp_path / "second"), init_lora_weights=str(tmp_path / "out" / "out.safetensors"))
    train_in_process(second)
    continued = load_file(tmp_path / "second" / "second.safetensors")
    assert continued.keys() == earlier.keys()
    assert max(float((continued[k] - earlier[k]).abs().max()) for k in earlier) < 1e-6

    wrong_rank = image_config(tmp_path, tiny.diffusers_dir, name="wrong.yaml", lora_rank=8, output_dir=str(tmp_path / "third"),
                              init_lora_weights=str(tmp_path / "out" / "out.safetensors"))
    proc = run_cli("train", "--config", str(wrong_rank))
    assert proc.returncode == 2 and "rank [4] differs from lora_rank 8; set lora_rank: 4" in proc.stderr
    assert not (tmp_path / "third").exists()
