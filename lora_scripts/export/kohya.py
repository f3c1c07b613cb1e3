"""Write an SD LoRA trained with PEFT as a kohya-ss / AUTOMATIC1111 `.safetensors` file, or as a
diffusers LoRA folder.

kohya's format (sd-scripts `networks/lora.py`), which A1111, ComfyUI and diffusers all read:
one module per adapted layer, named `(prefix + "." + module path).replace(".", "_")` with
prefixes `lora_unet`, `lora_te` (SD1/SD2) or `lora_te1`/`lora_te2` (SDXL), each holding
`lora_down.weight` (PEFT lora_A), `lora_up.weight` (PEFT lora_B) and a 0-d `alpha`; the update is
up @ down * alpha / rank, the same as PEFT's lora_alpha / r. SD1/SD2 UNet paths are diffusers'
(`down_blocks_0_attentions_0_…`); SDXL UNet paths are the original SGM ones
(`input_blocks_4_1_…`), because kohya trains SDXL on the SGM UNet. Text encoder paths always read
`text_model_encoder_layers_…`, as transformers 4's CLIPTextModel named them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.models.sd_detect import check_family

TEXT_ENCODER_PREFIXES = {
    "sd1": ("lora_te",), "sd2": ("lora_te",), "sd2_v": ("lora_te",), "sdxl": ("lora_te1", "lora_te2"),
}
# kohya: model_util.get_model_version_str_for_sd1_sd2 and sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2_v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
# kohya library/sai_model_spec.py: determine_architecture / determine_implementation
ARCHITECTURES = {
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
    "sd2_v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
}
IMPLEMENTATIONS = {
    "sd1": "diffusers", "sd2": "diffusers", "sd2_v": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}
# sd-webui-additional-networks' legacy hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits
LEGACY_HASH_SPAN = (0x100000, 0x110000)


def peft_to_kohya_state_dict(
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    family: str,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The PEFT LoRA layers of `unet` and `text_encoders` as kohya tensors.

    `text_encoders` lists the family's encoders in pipeline order (one for SD1/SD2, two for SDXL);
    ones without LoRA layers add nothing. `dtype` casts the up/down weights (alpha stays float32).
    Raises UserError for a DoRA adapter, which the kohya format cannot hold.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in kohya_named_layers(unet, text_encoders, family):
        add_kohya_module(state, name, layer, adapter_name, dtype)
    return state


def kohya_named_layers(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family: str) -> list[tuple[str, LoraLayer]]:
    """(kohya module name, PEFT LoRA layer) for every wrapped layer, e.g. `lora_unet_down_blocks_0_…`."""
    prefixes = TEXT_ENCODER_PREFIXES[check_family(family)]
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"{family} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    named = []
    layers_per_block = unet.config.layers_per_block
    for path, layer in lora_layers(unet):
        module = sgm_unet_path(path, layers_per_block) if family == "sdxl" else path
        named.append((f"lora_unet.{module}".replace(".", "_"), layer))
    for prefix, text_encoder in zip(prefixes, text_encoders):
        for path, layer in lora_layers(text_encoder):
            named.append((f"{prefix}.text_model.{path.removeprefix('text_model.')}".replace(".", "_"), layer))
    return named


def load_kohya_into_peft(state: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
                         family: str, source: str, adapter_name: str = "default") -> int:
    """Copy a kohya LoRA file's weights into the PEFT layers of the same modules (incremental training).

    Returns the number of modules loaded. Raises UserError when a file module has no matching
    layer, or its rank or alpha/rank scale differs from the layer's.
    """
    layers = dict(kohya_named_layers(unet, text_encoders, family))
    modules = sorted({key.split(".", 1)[0] for key in state})
    unknown = [m for m in modules if m not in layers]
    if unknown:
        raise UserError(f"init_lora_weights {source}: {len(unknown)} module(s) match no LoRA layer of this model (e.g. {unknown[0]}); was it trained on another model family or with train_text_encoder/target_modules set differently?")
    with torch.no_grad():
        for module in modules:
            layer = layers[module]
            down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
            alpha = float(state.get(f"{module}.alpha", torch.tensor(float(down.shape[0]))))
            scale = layer.scaling[adapter_name]
            if abs(alpha / down.shape[0] - scale) > 1e-6 * max(1.0, scale):
                raise UserError(f"init_lora_weights {source}: alpha {alpha:g} (scale {alpha / down.shape[0]:g}) differs from this run's scale {scale:g}; set lora_alpha: {alpha:g}")
            layer.lora_A[adapter_name].weight.copy_(down.reshape(layer.lora_A[adapter_name].weight.shape))
            layer.lora_B[adapter_name].weight.copy_(up.reshape(layer.lora_B[adapter_name].weight.shape))
    return len(modules)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """(module path, PEFT LoRA layer) for every layer PEFT wrapped in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def add_kohya_module(
    state: dict[str, torch.Tensor], name: str, layer: LoraLayer, adapter: str, dtype: torch.dtype | None
) -> None:
    """Add one layer's lora_down / lora_up / alpha under its kohya name."""
    if layer.use_dora[adapter]:
        raise UserError("a DoRA adapter cannot be saved in the kohya/A1111 format; use save_format: diffusers")
    down = layer.lora_A[adapter].weight.detach()
    up = layer.lora_B[adapter].weight.detach()
    state[f"{name}.lora_down.weight"] = down.to(dtype or down.dtype).contiguous()
    state[f"{name}.lora_up.weight"] = up.to(dtype or up.dtype).contiguous()
    # alpha = scale * rank reproduces PEFT's scale (alpha / r, or alpha / sqrt(r) with rsLoRA)
    state[f"{name}.alpha"] = torch.tensor(float(layer.scaling[adapter] * layer.r[adapter]), dtype=torch.float32)


def sgm_unet_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet transformer-block path in the original SGM numbering (kohya's SDXL names).

    Each down level holds layers_per_block resnets + a downsampler (input_blocks 1 + 3N + M for
    SDXL), each up level layers_per_block + 1 resnets (output_blocks 3N + M); the transformer is
    submodule 1 of its block and keeps its inner names.
    """
    stride = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(match[1]) * stride + int(match[2])}.1.{match[3]}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(match[1]) * stride + int(match[2])}.1.{match[3]}"
    raise ValueError(f"UNet module {path} has no SGM name here: only transformer-block layers are mapped")


@dataclass
class LoraTrainingFacts:
    """What a finished (or checkpointed) SD LoRA run records in its kohya metadata."""

    family: str
    output_name: str
    base_model: str
    network_dim: int
    network_alpha: float
    resolution: tuple[int, int]
    learning_rate: float
    steps: int
    epoch: int
    seed: int
    training_started_at: float
    training_finished_at: float
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    mixed_precision: str = "no"
    optimizer: str = "torch.optim.AdamW"
    lr_scheduler: str = "constant"
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: int | None = None
    max_train_steps: int | None = None
    num_train_images: int | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    clip_skip: int | None = None
    network_args: dict[str, str] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)


def kohya_metadata(facts: LoraTrainingFacts) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata A1111, civitai and kohya's tools read; all strings.

    Values are written as kohya's train_network.py writes them (`str(value)`, None as "None",
    JSON for dicts), so tools that parse kohya files parse these.
    """
    family = check_family(facts.family)
    width, height = facts.resolution
    training = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": facts.network_dim,
        "ss_network_alpha": facts.network_alpha,
        "ss_network_args": json.dumps(facts.network_args),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_v2": family in ("sd2", "sd2_v"),
        "ss_sd_model_name": Path(facts.base_model).name,
        "ss_output_name": facts.output_name,
        "ss_resolution": (width, height),
        "ss_learning_rate": facts.learning_rate,
        "ss_unet_lr": facts.unet_lr,
        "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_steps": facts.steps,
        "ss_epoch": facts.epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_num_train_images": facts.num_train_images,
        "ss_batch_size_per_device": facts.batch_size,
        "ss_gradient_accumulation_steps": facts.gradient_accumulation_steps,
        "ss_seed": facts.seed,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_optimizer": facts.optimizer,
        "ss_lr_scheduler": facts.lr_scheduler,
        "ss_noise_offset": facts.noise_offset,
        "ss_min_snr_gamma": facts.min_snr_gamma,
        "ss_clip_skip": facts.clip_skip,
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_training_started_at": facts.training_started_at,
        "ss_training_finished_at": facts.training_finished_at,
    }
    modelspec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ARCHITECTURES[family]}/lora",
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": facts.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(int(facts.training_finished_at)).isoformat(),
        "modelspec.prediction_type": "v" if family == "sd2_v" else "epsilon",
    }
    if facts.clip_skip is not None:
        modelspec["modelspec.encoder_layer"] = facts.clip_skip
    return {key: str(value) for key, value in {**training, **modelspec}.items()}


def save_kohya_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a kohya LoRA `.safetensors` with `metadata` plus kohya's precomputed hashes, atomically.

    `sshs_model_hash` is A1111's / additional-networks' addnet hash: sha256 of the bytes after the
    safetensors header, so editing metadata later does not change it. `sshs_legacy_hash` is taken,
    like kohya's `train_util.precalculate_safetensors_hashes`, from a serialisation holding only
    the `ss_*` metadata.
    """
    path = Path(path)
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    hashed = memoryview(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    header_end = 8 + int.from_bytes(hashed[:8], "little")
    hashes = {
        "sshs_model_hash": hashlib.sha256(hashed[header_end:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(hashed[slice(*LEGACY_HASH_SPAN)]).hexdigest()[:8],
    }
    data = save(tensors, {**metadata, **hashes})
    write_atomically(path.parent, lambda tmp: (tmp / path.name).write_bytes(data))


def save_diffusers_lora(
    folder: str | Path, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], adapter_name: str = "default"
) -> None:
    """Write the PEFT LoRA as a diffusers LoRA folder (`pytorch_lora_weights.safetensors`), atomically.

    Saved with `save_lora_weights` and each adapter's LoraConfig as metadata, as diffusers'
    train_dreambooth_lora(_sdxl).py does, so `pipe.load_lora_weights(folder)` restores alpha and
    rank. Keys stay in PEFT form (`unet.<module>.lora_A.weight`): the scripts'
    `convert_state_dict_to_diffusers` renames only attention projections, and the resulting mix
    with proj_in/ff keys is partly dropped on load. Text encoder keys keep the `text_model.`
    path transformers 4 used; diffusers strips it for transformers 5. Two text encoders mean
    SDXL; encoders without LoRA layers are skipped.
    """
    pipeline = StableDiffusionXLPipeline if len(text_encoders) == 2 else StableDiffusionPipeline
    names = ("text_encoder", "text_encoder_2")
    layers = {"unet": unet, **dict(zip(names, text_encoders))}
    kwargs = {}
    for name, model in layers.items():
        if not lora_layers(model):
            continue
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        if name != "unet":
            state = {f"text_model.{key.removeprefix('text_model.')}": value for key, value in state.items()}
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    write_atomically(Path(folder), lambda tmp: pipeline.save_lora_weights(tmp, safe_serialization=True, **kwargs))
