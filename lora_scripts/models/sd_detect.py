"""Read a Stable Diffusion base model and tell its family: sd1, sd2 (epsilon), sd2_v or sdxl.

A single-file checkpoint is recognised by its text encoder, the part that differs between families
(the same keys diffusers' `single_file_utils.CHECKPOINT_KEY_NAMES` and ComfyUI use):
OpenAI CLIP ViT-L under `cond_stage_model.transformer.` is SD1, OpenCLIP ViT-H under
`cond_stage_model.model.` is SD2, a second OpenCLIP (bigG) under `conditioner.embedders.1.model.`
is SDXL.

SD2 comes as 512-base (epsilon prediction) and 768-v (v-prediction) with identical shapes, so the
weights cannot always tell. In order:
1. a `v_pred` marker key (ComfyUI's convention for v-prediction checkpoints) means sd2_v;
2. ComfyUI's statistic (`comfy/supported_models.py`, `SD20.model_type`): std of
   `output_blocks.11.1.transformer_blocks.0.norm1.bias` > 0.09 means sd2_v, else sd2;
3. without that tensor (a pruned or non-standard UNet) fall back to diffusers' default for SD2
   single files, v-prediction (`single_file_utils._legacy_load_scheduler`: epsilon only for the
   512-base's global_step 875000, which .safetensors files do not carry).
Set `family` explicitly (sd2 / sd2_v) when the guess is wrong, as kohya's `--v_parameterization`.

A diffusers folder names its pipeline in model_index.json; SD1 and SD2 differ by the text encoder's
activation (quick_gelu: OpenAI CLIP, gelu: OpenCLIP) and sd2 / sd2_v by the scheduler's
`prediction_type`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_scripts.errors import UserError

SD_FAMILIES = ("sd1", "sd2", "sd2_v", "sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

UNET_PREFIX = "model.diffusion_model."
CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."
V_PRED_MARKER_KEY = "v_pred"
SD2_V_STATISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD_THRESHOLD = 0.09

FIX_BASE_MODEL = "set base_model to an SD1/SD2/SDXL .safetensors checkpoint or a diffusers folder"


def check_family(family: str) -> str:
    """Return `family` if it is a supported SD family name, else raise UserError."""
    if family not in SD_FAMILIES:
        raise UserError(f"unknown Stable Diffusion family {family!r}; use one of {', '.join(SD_FAMILIES)}")
    return family


def training_resolution(configured: int | None, family: str) -> int:
    """The config's `resolution`, or the one the family was made for: 1024 for SDXL, else 512."""
    if configured is not None:
        return configured
    return 1024 if family == "sdxl" else 512


def detect_sd_family(path: str | Path, override: str | None = None, allow_unsafe_pickle: bool = False) -> str:
    """The SD family of a diffusers folder or single-file checkpoint: sd1, sd2, sd2_v or sdxl.

    `override` wins when given. Raises UserError for a missing, unreadable, pickle (without
    consent) or non-Stable-Diffusion file.
    """
    if override is not None:
        return check_family(override)
    path = Path(path)
    if path.is_dir():
        return detect_diffusers_family(path)
    if path.suffix.lower() == ".safetensors":
        with open_safetensors(path) as handle:
            return detect_checkpoint_family(handle.keys(), handle.get_tensor, path)
    checkpoint = read_checkpoint(path, allow_unsafe_pickle)
    return detect_checkpoint_family(checkpoint.keys(), checkpoint.__getitem__, path)


def detect_diffusers_family(folder: Path) -> str:
    """Family of a diffusers pipeline folder, from its model_index.json and component configs."""
    pipeline = read_json(folder / "model_index.json").get("_class_name")
    if pipeline == "StableDiffusionXLPipeline":
        return "sdxl"
    if pipeline != "StableDiffusionPipeline":
        raise UserError(
            f"{folder} holds a {pipeline} pipeline; only StableDiffusionPipeline (SD1/SD2) and "
            f"StableDiffusionXLPipeline (SDXL base) are supported"
        )
    if read_json(folder / "text_encoder" / "config.json").get("hidden_act") != "gelu":
        return "sd1"
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    return "sd2_v" if scheduler.get("prediction_type") == "v_prediction" else "sd2"


def detect_checkpoint_family(
    keys: Iterable[str], get_tensor: Callable[[str], torch.Tensor], source: Path
) -> str:
    """Family of an original-layout (LDM/SGM) state dict, given its keys and a tensor getter."""
    keys = set(keys)
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise UserError(
            f"{source} holds no Stable Diffusion UNet (no `model.diffusion_model.*` weights; a LoRA, "
            f"VAE or UNet-only file?); {FIX_BASE_MODEL}"
        )
    if CONV_IN_KEY in keys and get_tensor(CONV_IN_KEY).shape[1] != 4:
        raise UserError(
            f"{source} is an inpainting/instruct checkpoint ({get_tensor(CONV_IN_KEY).shape[1]} UNet "
            f"input channels); train on the matching base model instead"
        )

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(SDXL_TEXT2_PREFIX):
        return "sdxl"
    if has(SDXL_REFINER_TEXT_PREFIX):
        raise UserError(f"{source} is an SDXL refiner, which is not supported; use the SDXL base model")
    if has(SD2_TEXT_PREFIX):
        return detect_sd2_prediction(keys, get_tensor)
    if has(SD1_TEXT_PREFIX):
        return "sd1"
    raise UserError(f"{source} has a UNet but no CLIP text encoder weights; {FIX_BASE_MODEL}")


def detect_sd2_prediction(keys: set[str], get_tensor: Callable[[str], torch.Tensor]) -> str:
    """sd2_v or sd2 for an SD2 checkpoint; see the module docstring for the rules and sources."""
    if V_PRED_MARKER_KEY in keys:
        return "sd2_v"
    if SD2_V_STATISTIC_KEY in keys:
        spread = torch.std(get_tensor(SD2_V_STATISTIC_KEY).float(), unbiased=False)
        return "sd2_v" if spread > SD2_V_STD_THRESHOLD else "sd2"
    return "sd2_v"


def open_safetensors(path: Path):
    """`safe_open(path)`, turning a missing, truncated or non-safetensors file into a UserError."""
    require_file(path)
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise unreadable_safetensors(path, err) from None


def read_checkpoint(path: Path, allow_unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint (.safetensors, or a pickle with consent)."""
    require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise unreadable_safetensors(path, err) from None
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unknown checkpoint type {suffix!r}; {FIX_BASE_MODEL}")
    if not allow_unsafe_pickle:
        raise UserError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
            f".safetensors, or set allow_unsafe_pickle: true if you trust its source"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a broken pickle can raise almost anything
        raise UserError(f"{path} could not be unpickled ({type(err).__name__}: {err}); download it again") from None
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def require_file(path: Path) -> None:
    """UserError unless `path` is an existing file."""
    if not path.is_file():
        raise UserError(f"base model {path} does not exist; {FIX_BASE_MODEL}")


def unreadable_safetensors(path: Path, err: Exception) -> UserError:
    """The error for a .safetensors file whose header or data cannot be read."""
    return UserError(f"{path} is not a readable .safetensors file ({err}); it may be truncated or "
                     f"corrupt, download it again")


def read_json(path: Path) -> dict:
    """A JSON config file as a dict; UserError when it is missing or malformed."""
    if not path.is_file():
        raise UserError(f"{path} is missing; a diffusers folder needs model_index.json and one "
                        f"config per component ({FIX_BASE_MODEL})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
