"""Test helper: diffusers-layout SD weights -> the original single-file (LDM/SGM) key layout.

diffusers ships only the other direction (original -> diffusers, used by the code under test), so
the tiny test checkpoints are written with this inverse; loading them back through diffusers'
converters checks both at once. The UNet map is a port of ComfyUI's `comfy/utils.py`
`unet_to_diffusers`, which the kohya-format tests also use to rebuild ComfyUI's and A1111's
LoRA key tables.
"""

from __future__ import annotations

import re

import torch

UNET_MAP_ATTENTIONS = ("proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias")
TRANSFORMER_BLOCKS = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
UNET_MAP_BASIC = {
    "add_embedding.linear_1.weight": "label_emb.0.0.weight", "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight", "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight", "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight", "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight", "conv_out.bias": "out.2.bias",
    "time_embedding.linear_1.weight": "time_embed.0.weight", "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight", "time_embedding.linear_2.bias": "time_embed.2.bias",
}


def comfy_unet_config(config) -> dict:
    """ComfyUI's description of a UNet (num_res_blocks, transformer depths) from a diffusers config."""
    levels = len(config["block_out_channels"])
    layers = config["transformer_layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    depth = [layers[x] if "CrossAttn" in config["down_block_types"][x] else 0 for x in range(levels)]
    per_block = config["layers_per_block"]
    return {
        "num_res_blocks": [per_block] * levels,
        "channel_mult": list(range(levels)),
        "transformer_depth": [depth[x] for x in range(levels) for _ in range(per_block)],
        # popped from the end, deepest level first, as ComfyUI's UNetModel builds output blocks
        "transformer_depth_output": [depth[x] for x in range(levels) for _ in range(per_block + 1)],
        "transformer_depth_middle": layers[-1],
    }


def comfy_unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """diffusers UNet key -> original key; port of ComfyUI comfy/utils.py `unet_to_diffusers`."""
    num_res_blocks = unet_config["num_res_blocks"]
    num_blocks = len(unet_config["channel_mult"])
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    mapping = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for ldm, diffusers in UNET_MAP_RESNET.items():
                mapping[f"down_blocks.{x}.resnets.{i}.{diffusers}"] = f"input_blocks.{n}.0.{ldm}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    mapping[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        mapping[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            n += 1
        for k in ("weight", "bias"):
            mapping[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    for b in UNET_MAP_ATTENTIONS:
        mapping[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(unet_config["transformer_depth_middle"]):
        for b in TRANSFORMER_BLOCKS:
            mapping[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for ldm, diffusers in UNET_MAP_RESNET.items():
            mapping[f"mid_block.resnets.{i}.{diffusers}"] = f"middle_block.{n}.{ldm}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 1
            for ldm, diffusers in UNET_MAP_RESNET.items():
                mapping[f"up_blocks.{x}.resnets.{i}.{diffusers}"] = f"output_blocks.{n}.0.{ldm}"
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    mapping[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        mapping[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            if i == length - 1:
                for k in ("weight", "bias"):
                    mapping[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    mapping.update(UNET_MAP_BASIC)
    return mapping


def unet_to_original(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights under `model.diffusion_model.<original key>`."""
    mapping = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    return {f"model.diffusion_model.{mapping[key]}": value for key, value in unet.state_dict().items()}


VAE_RENAMES = (
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def vae_to_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's weights under `first_stage_model.<original key>` (attention as 1x1 convs)."""
    levels = len(vae.config.up_block_types)
    result = {}
    for key, value in vae.state_dict().items():
        for pattern, replacement in VAE_RENAMES:
            key = re.sub(pattern, replacement, key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        result[f"first_stage_model.{key}"] = value
    return result


def clip_to_original(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text model under `<prefix>text_model.…` (its original layout is HF's)."""
    return {
        f"{prefix}text_model.{key.removeprefix('text_model.')}": value
        for key, value in text_encoder.state_dict().items()
    }


OPEN_CLIP_RENAMES = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)


def open_clip_to_original(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model in OpenCLIP's layout under `prefix` (q/k/v fused into in_proj)."""
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    result = {}
    for key, value in state.items():
        match = re.match(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if match:
            if match[2] == "q":
                fused = torch.cat([state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
                result[f"{prefix}transformer.resblocks.{match[1]}.attn.in_proj_{match[3]}"] = fused
            continue
        if key == "text_projection.weight":
            result[f"{prefix}text_projection"] = value.T.contiguous()
            continue
        for old, new in OPEN_CLIP_RENAMES:
            key = key.replace(old, new)
        result[prefix + key] = value
    return result


def text_encoders_to_original(family: str, text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The family's text encoder(s) in the original single-file layout."""
    if family == "sd1":
        return clip_to_original(text_encoders[0], "cond_stage_model.transformer.")
    if family in ("sd2", "sd2_v"):
        return open_clip_to_original(text_encoders[0], "cond_stage_model.model.")
    return {
        **clip_to_original(text_encoders[0], "conditioner.embedders.0.transformer."),
        **open_clip_to_original(text_encoders[1], "conditioner.embedders.1.model."),
    }
