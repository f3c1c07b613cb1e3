"""The kohya/A1111 LoRA file: diffusers loads it to the trained outputs, A1111 and ComfyUI find a
module for every key, metadata and hashes are what their readers expect."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import (
    LoraTrainingFacts,
    kohya_metadata,
    peft_to_kohya_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from lora_scripts.models.sd import ASSETS, load_sd_components, sd_target_modules
from tests.sd_original_layout import (
    comfy_unet_config,
    comfy_unet_to_diffusers,
    text_encoders_to_original,
    unet_to_original,
)
from tests.tiny_sd import TE2_PROJECTION, make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def wrap_with_lora(unet, text_encoders, seed: int = 1) -> None:
    """PEFT LoRA on kohya's default modules, as diffusers' training scripts attach it, with random
    non-zero up weights so the adapter changes every output; alpha != rank to check the scale."""
    torch.manual_seed(seed)
    for model, rank, alpha in [(unet, 4, 8), *[(encoder, 2, 3) for encoder in text_encoders]]:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sd_target_modules(model), init_lora_weights="gaussian")
        model.add_adapter(config)
    for model in (unet, *text_encoders):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)


def outputs(unet, text_encoders, family: str) -> list[torch.Tensor]:
    """UNet noise prediction and every text encoder's hidden states on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, TE2_PROJECTION, generator=generator),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]),
        }
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        return [unet(sample, 500, context, **extra).sample] + [te(ids).last_hidden_state for te in text_encoders]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_loads_both_formats_to_the_trained_outputs(tmp_path, family):
    tiny = make_tiny_sd(tmp_path, family)
    components = load_sd_components(tiny.diffusers_dir)
    base = outputs(components.unet, components.text_encoders, family)
    wrap_with_lora(components.unet, components.text_encoders)
    trained = outputs(components.unet, components.text_encoders, family)
    for before, after in zip(base, trained):
        assert (after - before).abs().max() > 1e-2  # the adapter changes every model

    kohya_file = tmp_path / "out" / "style.safetensors"
    state = peft_to_kohya_state_dict(components.unet, components.text_encoders, family)
    save_kohya_lora(kohya_file, state, {"ss_output_name": "style"})
    save_diffusers_lora(tmp_path / "diffusers_lora", components.unet, components.text_encoders)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["style.safetensors"]  # no temp files left

    for lora in (kohya_file, tmp_path / "diffusers_lora"):
        pipe = PIPELINES[family].from_pretrained(tiny.diffusers_dir)
        pipe.load_lora_weights(lora)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        for loaded, expected in zip(outputs(pipe.unet, encoders, family), trained):
            torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)


def test_dora_adapters_are_refused(tmp_path):
    tiny = make_tiny_sd(tmp_path, "sd1")
    components = load_sd_components(tiny.diffusers_dir)
    components.unet.add_adapter(LoraConfig(r=2, target_modules=sd_target_modules(components.unet), use_dora=True))
    with pytest.raises(UserError, match="DoRA adapter cannot be saved in the kohya/A1111 format"):
        peft_to_kohya_state_dict(components.unet, components.text_encoders, "sd1")


# ---------------------------------------------------------------------------------------------
# Key names against the consumers' own lookup rules, on full-size (meta device) SD1.5 and SDXL


def full_size_lora_state(family: str):
    """Meta-device full-size UNet + text encoders from the shipped configs: the UNet config, each
    text encoder's own state-dict keys, the original-layout (LDM/SGM) checkpoint keys, and the
    kohya state dict after wrapping them with LoRA on `sd_target_modules`."""
    configs = ASSETS / "sd" / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2")))
        encoder_keys = [list(encoder.state_dict()) for encoder in encoders]
        original_keys = set(unet_to_original(unet)) | set(text_encoders_to_original(family, encoders))
        for model in (unet, *encoders):
            model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=sd_target_modules(model)))
    return unet.config, encoder_keys, original_keys, peft_to_kohya_state_dict(unet, encoders, family)


def module_names(state: dict) -> set[str]:
    return {key.split(".", 1)[0] for key in state}


# AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py,
# convert_diffusers_name_to_compvis (the rules SD1 and SDXL files reach)
def a1111_convert_diffusers_name_to_compvis(key: str) -> str:
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block = 1 + int(m[1]) * 3 + int(m[3])
        return f"diffusion_model_input_blocks_{block}_{1 if m[2] == 'attentions' else 0}_{m[4]}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        part = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{part}"
    return key


# ... and load_network: direct hit, then a fused q/k/v MultiheadAttention, then SGM names.
def a1111_find_module(name: str, layer_mapping: set[str]) -> str | None:
    key = a1111_convert_diffusers_name_to_compvis(name)
    if key in layer_mapping:
        return key
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in layer_mapping:
        return m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in name:
        key = name.replace("lora_te1_text_model", "0_transformer_text_model")
    return key if key in layer_mapping else None


def a1111_layer_mapping(original_keys: set[str]) -> set[str]:
    """A1111's network_layer_mapping: every module of the LDM model (sd_model.model) and of the
    text conditioner(s), dots as underscores; SDXL conditioner i is prefixed `i_`."""
    names = set()
    for key in original_keys:
        parts = key.split(".")[:-1]
        if parts[0] == "model":  # model.diffusion_model.…
            parts = parts[1:]
        elif parts[0] == "cond_stage_model":
            parts = parts[1:]
        elif parts[0] == "conditioner":  # conditioner.embedders.<i>.…
            parts = [parts[2]] + parts[3:]
        names.update("_".join(parts[:n]) for n in range(1, len(parts) + 1))
    return names


# comfyanonymous/ComfyUI comfy/lora.py, model_lora_keys_unet / model_lora_keys_clip
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfy_key_map(unet_config, encoder_keys: list[list[str]]) -> dict[str, str]:
    key_map = {}
    diffusers_to_ldm = comfy_unet_to_diffusers(comfy_unet_config(unet_config))
    for ldm_key in diffusers_to_ldm.values():
        if ldm_key.endswith(".weight"):
            key_map["lora_unet_" + ldm_key[: -len(".weight")].replace(".", "_")] = ldm_key
    for diffusers_key, ldm_key in diffusers_to_ldm.items():
        if diffusers_key.endswith(".weight"):
            key_map["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = ldm_key
    # ComfyUI holds CLIP-L as clip_l.transformer.text_model.… and SDXL's bigG as clip_g.…
    sdk = {
        f"{clip}.transformer.text_model.{key.removeprefix('text_model.')}"
        for clip, keys in zip(("clip_l", "clip_g"), encoder_keys)
        for key in keys
    }
    for b in range(32):
        for c, lora_name in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_name}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_name}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_name}"] = k
    return key_map


@pytest.mark.parametrize(("family", "unet_count", "text_count"), [("sd1", 192, 72), ("sdxl", 722, 264)])
def test_every_key_maps_to_a_module_in_a1111_and_comfyui(family, unet_count, text_count):
    unet_config, encoder_keys, original_keys, state = full_size_lora_state(family)
    names = module_names(state)
    assert len([n for n in names if n.startswith("lora_unet_")]) == unet_count
    assert len([n for n in names if n.startswith("lora_te")]) == text_count
    assert len(state) == 3 * len(names)
    for name in names:
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= state.keys()
        assert state[f"{name}.alpha"].ndim == 0 and state[f"{name}.alpha"].dtype == torch.float32
        assert state[f"{name}.lora_up.weight"].shape[1] == state[f"{name}.lora_down.weight"].shape[0] == 4

    layer_mapping = a1111_layer_mapping(original_keys)
    unmatched = sorted(name for name in names if a1111_find_module(name, layer_mapping) is None)
    assert unmatched == [], f"A1111 'Failed to match keys': {unmatched[:5]}"

    key_map = comfy_key_map(unet_config, encoder_keys)
    loadable = {f"{x}.{part}" for x in key_map for part in ("lora_up.weight", "lora_down.weight", "alpha")}
    not_loaded = sorted(set(state) - loadable)
    assert not_loaded == [], f"ComfyUI 'lora key not loaded': {not_loaded[:5]}"
    if family == "sdxl":  # kohya's SDXL files name UNet blocks the SGM way
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    else:
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
        assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in names


# ---------------------------------------------------------------------------------------------
# Metadata and hashes


def facts(family: str, **changes) -> LoraTrainingFacts:
    values = dict(
        family=family, output_name="my_style_lora", base_model="./models/Stable-diffusion/v1-5-pruned.safetensors",
        network_dim=8, network_alpha=4.0, resolution=(512, 512), learning_rate=2e-4, steps=250, epoch=10,
        seed=42, training_started_at=1_700_000_000.5, training_finished_at=1_700_003_600.25,
        tag_frequency={"style_train": {"ink wash painting": 12, "水墨": 3}}, mixed_precision="fp16",
    )
    values.update(changes)
    return LoraTrainingFacts(**values)


REQUIRED_KEYS = {
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "ss_output_name", "ss_resolution", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_steps",
    "ss_epoch", "ss_seed", "ss_mixed_precision", "ss_optimizer", "ss_noise_offset", "ss_min_snr_gamma",
    "ss_tag_frequency", "ss_sd_model_name", "ss_training_started_at", "ss_training_finished_at",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution",
}


@pytest.mark.parametrize(
    ("family", "version", "v2", "architecture"),
    [
        ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora"),
        ("sd2_v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora"),
        ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
    ],
)
def test_metadata_is_what_a1111_reads(family, version, v2, architecture):
    metadata = kohya_metadata(facts(family))
    assert REQUIRED_KEYS <= metadata.keys()
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4.0")
    # A1111 network.py NetworkOnDisk.detect_version: "sdxl_" prefix -> SDXL, ss_v2 == "True" -> SD2
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == (version, v2)
    assert metadata["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert metadata["ss_resolution"] == "(512, 512)" and metadata["modelspec.resolution"] == "512x512"
    assert json.loads(metadata["ss_tag_frequency"]) == {"style_train": {"ink wash painting": 12, "水墨": 3}}
    assert json.loads(metadata["ss_network_args"]) == {}
    assert float(metadata["ss_training_finished_at"]) == 1_700_003_600.25
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "my_style_lora"


def addnet_hash(path) -> str:
    """sd-webui-additional-networks / A1111 hashes.addnet_hash_safetensors, computed independently."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def test_saved_file_hashes_and_metadata(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # > 1.1 MB of tensors so the legacy hash window (64 KiB at 1 MiB) holds tensor bytes
    state = {
        "lora_unet_a.lora_down.weight": torch.randn(8, 20000, generator=generator),
        "lora_unet_a.lora_up.weight": torch.randn(30, 8, generator=generator),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    metadata = kohya_metadata(facts("sd1"))
    first = tmp_path / "first.safetensors"
    save_kohya_lora(first, state, metadata)
    with safe_open(first, framework="pt") as handle:
        stored = handle.metadata()
    assert {k: v for k, v in stored.items() if not k.startswith("sshs_")} == metadata
    assert stored["sshs_model_hash"] == addnet_hash(first)
    for key, value in load_file(first).items():
        assert torch.equal(value, state[key])

    # kohya's legacy hash: 64 KiB at offset 1 MiB of a file carrying only the ss_* metadata
    reference = tmp_path / "ss_only.safetensors"
    save_file(state, reference, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert stored["sshs_legacy_hash"] == hashlib.sha256(reference.read_bytes()[0x100000:0x110000]).hexdigest()[:8]

    second = tmp_path / "second.safetensors"
    save_kohya_lora(second, state, kohya_metadata(facts("sd1", output_name="renamed", steps=999)))
    with safe_open(second, framework="pt") as handle:
        renamed = handle.metadata()
    assert renamed["ss_output_name"] == "renamed" and second.read_bytes() != first.read_bytes()
    assert renamed["sshs_model_hash"] == stored["sshs_model_hash"] == addnet_hash(second)

    save_kohya_lora(first, {**state, "lora_unet_a.alpha": torch.tensor(8.0)}, metadata)  # overwrite in place
    assert addnet_hash(first) != stored["sshs_model_hash"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["first.safetensors", "second.safetensors", "ss_only.safetensors"]  # no temp files
