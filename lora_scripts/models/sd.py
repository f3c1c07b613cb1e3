"""Load a Stable Diffusion base model (SD1, SD2, SDXL) offline, and name the modules LoRA adapts.

Two inputs are accepted:
- a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ …);
- a single-file checkpoint in the original LDM/SGM key layout (`v1-5-pruned.safetensors`,
  `sd_xl_base_1.0.safetensors`). diffusers' own single-file converters read it; the component
  configs they need come from `config_dir`, by default the full-size SD1.5 / SD2.1 / SDXL-base
  configs shipped in `lora_scripts/assets/sd/<family>/` (nothing is downloaded). Pass
  `config_dir` (a diffusers-layout folder with unet/, vae/, text_encoder[_2]/ and scheduler/
  configs) for a checkpoint of another shape, e.g. a tiny test model. Single files use the
  CLIP tokenizer shipped in `lora_scripts/assets/clip_tokenizer/` (built by
  tools/build_clip_tokenizer.py), with each family's padding token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
from diffusers.models import Transformer2DModel
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP

from lora_scripts.errors import UserError
from lora_scripts.models.sd_detect import (
    check_family,
    detect_checkpoint_family,
    detect_diffusers_family,
    read_checkpoint,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
FAMILY_CONFIG_DIRS = {"sd1": "sd1", "sd2": "sd2", "sd2_v": "sd2", "sdxl": "sdxl"}
PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "epsilon", "sd2_v": "v_prediction", "sdxl": "epsilon"}

# (component folder, model class, tokenizer folder, padding token) per text encoder. OpenCLIP
# (SD2, SDXL's second encoder) pads with "!", OpenAI CLIP with <|endoftext|>, as in the
# tokenizers of the official diffusers repositories.
CLIP_L = ("text_encoder", CLIPTextModel, "tokenizer", "<|endoftext|>")
OPEN_CLIP_H = ("text_encoder", CLIPTextModel, "tokenizer", "!")
OPEN_CLIP_BIG_G = ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2", "!")
TEXT_ENCODERS = {"sd1": (CLIP_L,), "sd2": (OPEN_CLIP_H,), "sd2_v": (OPEN_CLIP_H,), "sdxl": (CLIP_L, OPEN_CLIP_BIG_G)}

# kohya-ss sd-scripts networks/lora.py: LoRA goes on every Linear / 1x1 Conv2d inside these.
LORA_CONTAINER_CLASSES = (Transformer2DModel, CLIPAttention, CLIPMLP)
# ... and, with conv_dim (LoCon), on every Linear / Conv2d inside these (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3)
CONV_CONTAINER_CLASSES = (ResnetBlock2D, Downsample2D, Upsample2D)


@dataclass
class SDComponents:
    """Everything a Stable Diffusion LoRA run needs from the base model."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection]
    tokenizers: list[CLIPTokenizer]
    noise_scheduler: DDPMScheduler
    prediction_type: str


def load_sd_components(
    path: str | Path,
    family: str | None = None,
    allow_unsafe_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
) -> SDComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDPM noise scheduler, offline.

    `path`: a diffusers folder or a single-file checkpoint. `family` (sd1, sd2, sd2_v, sdxl)
    overrides detection and sets the prediction type. `config_dir` (single files only) replaces
    the shipped component configs. Raises UserError for a missing, truncated, pickle (without
    `allow_unsafe_pickle`) or non-SD file, or weights that do not fit the configs.
    """
    path = Path(path)
    if path.is_dir():
        family = check_family(family) if family else detect_diffusers_family(path)
        return load_diffusers_folder(path, family, dtype)
    checkpoint = read_checkpoint(path, allow_unsafe_pickle)
    if family:
        family = check_family(family)
    else:
        family = detect_checkpoint_family(checkpoint.keys(), checkpoint.__getitem__, path)
    configs = Path(config_dir) if config_dir else ASSETS / "sd" / FAMILY_CONFIG_DIRS[family]
    require_configs(configs, family)
    try:
        return load_single_file(checkpoint, family, configs, dtype)
    except (SingleFileComponentError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"{path} does not fit the {family} configs in {configs} ({one_line(err)}); set `family` "
            f"to the checkpoint's real family, or point config_dir at configs of its shape"
        ) from None


def load_diffusers_folder(folder: Path, family: str, dtype: torch.dtype) -> SDComponents:
    """Components of a diffusers pipeline folder."""
    require_configs(folder, family)
    local = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **local)
        encoders = TEXT_ENCODERS[family]
        text_encoders = [
            cls.from_pretrained(folder, subfolder=sub, dtype=dtype, **local) for sub, cls, _, _ in encoders
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=tok, **local) for _, _, tok, _ in encoders]
    except OSError as err:
        raise UserError(f"cannot load the diffusers folder {folder}: {one_line(err)}") from None
    return SDComponents(
        family, unet, vae, text_encoders, tokenizers, noise_scheduler(folder, family), PREDICTION_TYPES[family]
    )


def load_single_file(
    checkpoint: dict[str, torch.Tensor], family: str, config_dir: Path, dtype: torch.dtype
) -> SDComponents:
    """Components of an original-layout state dict, converted by diffusers' single-file loaders."""
    options = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **options)
    vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **options)
    encoders = TEXT_ENCODERS[family]
    text_encoders = [
        create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=sub, **options) for sub, cls, _, _ in encoders
    ]
    tokenizers = [
        CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=pad, local_files_only=True)
        for _, _, _, pad in encoders
    ]
    return SDComponents(
        family, unet, vae, text_encoders, tokenizers, noise_scheduler(config_dir, family), PREDICTION_TYPES[family]
    )


def noise_scheduler(folder: Path, family: str) -> DDPMScheduler:
    """The training noise scheduler: DDPM with the model's betas and the family's prediction type."""
    config = DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler.from_config(config, prediction_type=PREDICTION_TYPES[family])


def require_configs(folder: Path, family: str) -> None:
    """UserError naming every component config missing from a diffusers-layout folder."""
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    needed += [f"{sub}/config.json" for sub, _, _, _ in TEXT_ENCODERS[family]]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} lacks {', '.join(missing)}; a {family} model folder needs the diffusers "
            f"layout (unet/, vae/, text_encoder/ …, scheduler/)"
        )


def sd_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules kohya's default LoRA network adapts in a UNet or CLIP text encoder.

    Every Linear and 1x1 Conv2d inside the UNet's Transformer2DModel blocks (proj_in, proj_out,
    attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) and inside CLIP's attention
    and MLP blocks (q/k/v/out_proj, fc1, fc2): 192 UNet + 72 text modules for SD1.5, 722 + 264 for
    SDXL. Full module paths, for `peft.LoraConfig(target_modules=...)`.
    """
    names = []
    for container_name, container in model.named_modules():
        if not isinstance(container, LORA_CONTAINER_CLASSES):
            continue
        for child_name, child in container.named_modules():
            is_1x1_conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, torch.nn.Linear) or is_1x1_conv:
                names.append(f"{container_name}.{child_name}")
    return names


def sd_conv_target_modules(unet: torch.nn.Module) -> dict[str, bool]:
    """The layers kohya's LoCon adds with `conv_dim`: every Linear and Conv2d inside the UNet's
    ResNet blocks (conv1, conv2, time_emb_proj, conv_shortcut), downsamplers and upsamplers, as
    {module path: is a 3x3 conv}. The 3x3 convs train at conv_dim, the others at the network rank."""
    found = {}
    for container_name, container in unet.named_modules():
        if isinstance(container, CONV_CONTAINER_CLASSES):
            for child_name, child in container.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    found[f"{container_name}.{child_name}"] = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (3, 3)
    return found


def one_line(err: BaseException) -> str:
    """An exception message squeezed onto one line, for UserError."""
    return " ".join(str(err).split())
