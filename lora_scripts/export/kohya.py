"""Write an SD LoRA trained with PEFT as a kohya-ss / AUTOMATIC1111 `.safetensors` file, or as a
diffusers LoRA folder.

kohya's format (sd-scripts `networks/lora.py`), which A1111, ComfyUI and diffusers all read:
one module per adapted layer, named `(prefix + "." + module path).replace(".", "_")` with
prefixes `lora_unet`, `lora_te` (SD1/SD2) or `lora_te1`/`lora_te2` (SDXL), each holding
`lora_down.weight` (PEFT lora_A), `lora_up.weight` (PEFT lora_B) and a 0-d `alpha`; the update is
up @ down * alpha / rank, the same as PEFT's lora_alpha / r. SD1/SD2 UNet paths are diffusers'
(`down_blocks_0_attentions_0_…`); SDXL UNet paths are the original SGM ones
(`input_blocks_4_1_…`), because kohya trains SDXL on the SGM UNet. Text encoder paths always read
`text_model_encoder_layers_…`, as transformers 4's CLIPTextModel named them. With `conv_dim`
(LoCon) the ResNet blocks, down- and upsamplers are adapted too (SGM names for SDXL:
`input_blocks_1_0_in_layers_2`, `input_blocks_3_0_op`, `output_blocks_2_2_conv`); LoHa and LoKr
modules carry LyCORIS' factor names instead of lora_down/lora_up (kohya_layers.py).
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
from safetensors.torch import save

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.export.kohya_layers import ADAPTER_LAYERS, layer_tensors, load_layer_tensors
from lora_scripts.models.sd_detect import check_family

TEXT_ENCODER_PREFIXES = {
    "sd1": ("lora_te",), "sd2": ("lora_te",), "sd2_v": ("lora_te",), "sdxl": ("lora_te1", "lora_te2"),
}
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")  # the pipeline attributes, in that order
# The layers kohya's default network adapts (models/sd.py sd_target_modules), plus LoCon's conv set
# (sd_conv_target_modules: ResNet blocks, down- and upsamplers), as diffusers paths
UNET_MODULE = re.compile(
    r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0|up_blocks\.\d+\.attentions\.\d+)\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"|(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
)
# diffusers ResnetBlock2D layer -> its name inside an LDM/SGM ResBlock (A1111 networks.py suffix_conversion)
RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# whether each up block holds attentions, in the full-size models (assets/sd/*/unet/config.json up_block_types):
# an SGM output block's upsampler is submodule 2 after a transformer, else 1
UP_ATTENTION = {"sd1": (False, True, True, True), "sd2": (False, True, True, True), "sd2_v": (False, True, True, True),
                "sdxl": (True, True, False)}
TEXT_ENCODER_MODULE = re.compile(r"encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])")
# A kohya name is a module path with every "." made "_"; these words of the paths keep their own "_"
KOHYA_NAME_WORD = re.compile(
    r"(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|transformer_blocks|proj_in"
    r"|proj_out|to_[qkv]|to_out|text_model|self_attn|[qkv]_proj|out_proj|time_emb_proj|conv_shortcut|in_layers"
    r"|out_layers|emb_layers|skip_connection)(?=_|$)|[^_]+"
)
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
    """The PEFT LoRA / LoHa / LoKr layers of `unet` and `text_encoders` as kohya tensors
    (LyCORIS' names for LoHa and LoKr, see kohya_layers.py).

    `text_encoders` lists the family's encoders in pipeline order (one for SD1/SD2, two for SDXL);
    ones without adapter layers add nothing. `dtype` casts the factors (alpha stays float32).
    Raises UserError for a DoRA adapter, which the kohya format cannot hold.
    """
    return {f"{name}.{suffix}": tensor for name, layer in kohya_named_layers(unet, text_encoders, family)
            for suffix, tensor in layer_tensors(layer, adapter_name, dtype).items()}


def kohya_named_layers(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family: str) -> list[tuple[str, torch.nn.Module]]:
    """(kohya module name, PEFT adapter layer) for every wrapped layer, e.g. `lora_unet_down_blocks_0_…`."""
    prefixes = TEXT_ENCODER_PREFIXES[check_family(family)]
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"{family} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    layers_per_block = unet.config.layers_per_block
    up_attention = tuple("CrossAttn" in block for block in unet.config.up_block_types)
    return [
        (kohya_module_name(component, path, family, layers_per_block, up_attention), layer)
        for component, model in zip(("unet", *TEXT_ENCODER_COMPONENTS), (unet, *text_encoders))
        for path, layer in lora_layers(model)
    ]


def kohya_module_name(component: str, path: str, family: str, layers_per_block: int,
                      up_attention: tuple[bool, ...] | None = None) -> str:
    """kohya's name of the module at `path` in a pipeline component (unet, text_encoder, text_encoder_2).

    `up_attention` (which UNet up blocks hold attentions) places SDXL upsamplers; default: the
    full-size family's. Raises ValueError for an SDXL UNet path with no SGM name here and
    KeyError for a text encoder the family does not have.
    """
    if component == "unet":
        up_attention = UP_ATTENTION[check_family(family)] if up_attention is None else up_attention
        module = sgm_unet_path(path, layers_per_block, up_attention) if family == "sdxl" else path
        return f"lora_unet.{module}".replace(".", "_")
    prefix = dict(zip(TEXT_ENCODER_COMPONENTS, TEXT_ENCODER_PREFIXES[check_family(family)]))[component]
    return f"{prefix}.text_model.{path.removeprefix('text_model.')}".replace(".", "_")


def diffusers_module_path(name: str, family: str, layers_per_block: int) -> tuple[str, str] | None:
    """(pipeline component, diffusers module path) of a kohya module name: kohya_module_name inverted.

    Only the modules kohya's networks adapt (attention and MLP layers of the UNet's transformer
    blocks and of the text encoders; LoCon's ResNet, downsampler and upsampler layers) are
    mapped; text encoder paths come without
    `text_model.` (transformers 5 names). None for any other name, or one of another family
    (SDXL's UNet names are SGM ones, its text encoders lora_te1 / lora_te2).
    """
    prefixes = {"lora_unet": "unet", **dict(zip(TEXT_ENCODER_PREFIXES[check_family(family)], TEXT_ENCODER_COMPONENTS))}
    prefix = next((p for p in prefixes if name.startswith(p + "_")), None)
    if prefix is None:
        return None
    component = prefixes[prefix]
    path = ".".join(KOHYA_NAME_WORD.findall(name[len(prefix) + 1:]))
    if component != "unet":
        path, pattern = path.removeprefix("text_model."), TEXT_ENCODER_MODULE
    else:
        path, pattern = (diffusers_unet_path(path, layers_per_block) if family == "sdxl" else path), UNET_MODULE
    if path is None or not pattern.fullmatch(path) or kohya_module_name(component, path, family, layers_per_block) != name:
        return None
    return component, path


def load_kohya_into_peft(state: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
                         family: str, source: str, adapter_name: str = "default") -> int:
    """Copy a kohya / LyCORIS file's weights into the PEFT layers of the same modules (incremental
    training, generate).

    Returns the number of modules loaded. Raises UserError when a file module has no matching
    layer, is another kind (LoRA / LoHa / LoKr), or its rank or alpha/rank scale differs.
    """
    layers = dict(kohya_named_layers(unet, text_encoders, family))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = tensor
    unknown = sorted(m for m in modules if m not in layers)
    if unknown:
        raise UserError(f"{source}: {len(unknown)} module(s) match no LoRA layer of this model (e.g. {unknown[0]}); was it trained on another model family or with train_text_encoder/target_modules/conv_dim set differently?")
    for module, tensors in sorted(modules.items()):
        load_layer_tensors(layers[module], adapter_name, tensors, f"{source} module {module}")
    return len(modules)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module path, PEFT adapter layer: LoRA, LoHa or LoKr) for every layer PEFT wrapped in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ADAPTER_LAYERS)]


def sgm_unet_path(path: str, layers_per_block: int, up_attention: tuple[bool, ...] | None = None) -> str:
    """A diffusers UNet path in the original LDM/SGM numbering (kohya's SDXL names, single-file keys).

    Each down level holds layers_per_block resnets + a downsampler (input_blocks 1 + 3N + M for
    SDXL), each up level layers_per_block + 1 resnets (output_blocks 3N + M); in a block the
    ResBlock is submodule 0, the transformer 1, and an up level's upsampler follows them (2 after
    a transformer, else 1; `up_attention` tells which up blocks have one, default A1111's SD1
    rule: all but the first). Raises ValueError for a path outside these blocks.
    """
    stride = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path):
        inner = match[4] if match[2] == "attentions" else RESNET_LAYERS.get(match[4])
        if inner is not None:
            return f"input_blocks.{1 + int(match[1]) * stride + int(match[3])}.{int(match[2] == 'attentions')}.{inner}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(match[1]) + 1) * stride}.0.op"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{match[1]}"
    if (match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", path)) and match[2] in RESNET_LAYERS:
        return f"middle_block.{2 * int(match[1])}.{RESNET_LAYERS[match[2]]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path):
        inner = match[4] if match[2] == "attentions" else RESNET_LAYERS.get(match[4])
        if inner is not None:
            return f"output_blocks.{int(match[1]) * stride + int(match[3])}.{int(match[2] == 'attentions')}.{inner}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        level = int(match[1])
        attention = up_attention[level] if up_attention is not None else level > 0
        return f"output_blocks.{level * stride + layers_per_block}.{2 if attention else 1}.conv"
    raise ValueError(f"UNet module {path} has no SGM name here: only transformer-block, ResNet and sampler layers are mapped")


def diffusers_unet_path(path: str, layers_per_block: int) -> str | None:
    """The diffusers path of an SGM UNet path (sgm_unet_path inverted), or None."""
    stride = layers_per_block + 1
    resnet_layers = {inner: name for name, inner in RESNET_LAYERS.items()}
    if match := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", path):
        level, index = divmod(int(match[1]) - 1, stride)
        if index == layers_per_block:
            return f"down_blocks.{level}.downsamplers.0.conv" if (match[2], match[3]) == ("0", "op") else None
        if match[2] == "1":
            return f"down_blocks.{level}.attentions.{index}.{match[3]}"
        return f"down_blocks.{level}.resnets.{index}.{resnet_layers[match[3]]}" if match[3] in resnet_layers else None
    if match := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{match[1]}"
    if (match := re.fullmatch(r"middle_block\.([02])\.(.+)", path)) and match[2] in resnet_layers:
        return f"mid_block.resnets.{int(match[1]) // 2}.{resnet_layers[match[2]]}"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.[12]\.conv", path):
        level, index = divmod(int(match[1]), stride)
        return f"up_blocks.{level}.upsamplers.0.conv" if index == layers_per_block else None
    if match := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", path):
        level, index = divmod(int(match[1]), stride)
        return f"up_blocks.{level}.attentions.{index}.{match[2]}"
    if (match := re.fullmatch(r"output_blocks\.(\d+)\.0\.(.+)", path)) and match[2] in resnet_layers:
        level, index = divmod(int(match[1]), stride)
        return f"up_blocks.{level}.resnets.{index}.{resnet_layers[match[2]]}"
    return None


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
    network_module: str = "networks.lora"  # kohya's LoRA/LoCon; "lycoris.kohya" for LoHa/LoKr
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
        "ss_network_module": facts.network_module,
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
    hashes = {
        "sshs_model_hash": addnet_hash(hashed),
        "sshs_legacy_hash": hashlib.sha256(hashed[slice(*LEGACY_HASH_SPAN)]).hexdigest()[:8],
    }
    data = save(tensors, {**metadata, **hashes})
    write_atomically(path.parent, lambda tmp: (tmp / path.name).write_bytes(data))


def addnet_hash(data: bytes | memoryview) -> str:
    """A1111's / additional-networks' addnet hash of a serialized `.safetensors`: sha256 of the
    bytes after the header (8-byte length + JSON), so metadata edits do not change it."""
    view = memoryview(data)
    return hashlib.sha256(view[8 + int.from_bytes(view[:8], "little"):]).hexdigest()


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
