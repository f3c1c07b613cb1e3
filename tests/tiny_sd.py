"""Test helper: tiny random Stable Diffusion pipelines (SD1, SD2-v, SDXL) saved as real files.

Each is written both as a diffusers folder and as a single `.safetensors` checkpoint in the
original key layout, plus a weight-free `configs/` folder (the component configs only) that
`load_sd_components(single_file, config_dir=...)` needs for a checkpoint of this shape.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_scripts.models.sd import ASSETS, CLIP_TOKENIZER_DIR
from tests.sd_original_layout import text_encoders_to_original, unet_to_original, vae_to_original

TE_HIDDEN = {"text_encoder": 32, "text_encoder_2": 40}
TE2_PROJECTION = 32
TIME_EMBED = 8
UNET_SHAPES = {
    "sd1": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    ),
    "sd2_v": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    ),
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TE_HIDDEN["text_encoder"] + TE_HIDDEN["text_encoder_2"], attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * TIME_EMBED,
    ),
}
ASSET_FOLDERS = {"sd1": "sd1", "sd2_v": "sd2", "sdxl": "sdxl"}
CONFIG_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder_2/config.json")


@dataclass
class TinySD:
    """Where a tiny pipeline was written."""

    family: str
    diffusers_dir: Path
    single_file: Path
    config_dir: Path


def make_tiny_sd(tmp_path: Path, family: str = "sd1") -> TinySD:
    """Build a seeded tiny `family` pipeline ("sd1", "sd2_v" or "sdxl") and save it three ways."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, **UNET_SHAPES[family]
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler_config = diffusers.DDPMScheduler.load_config(ASSETS / "sd" / ASSET_FOLDERS[family], subfolder="scheduler")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=tiny_clip(CLIPTextModel, "quick_gelu", "text_encoder"), tokenizer=tokenizer("<|endoftext|>"),
            text_encoder_2=tiny_clip(CLIPTextModelWithProjection, "gelu", "text_encoder_2"), tokenizer_2=tokenizer("!"),
        )
        text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    else:
        act, pad = ("quick_gelu", "<|endoftext|>") if family == "sd1" else ("gelu", "!")
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=tiny_clip(CLIPTextModel, act, "text_encoder"),
            tokenizer=tokenizer(pad), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        text_encoders = [pipe.text_encoder]

    diffusers_dir = tmp_path / f"tiny_{family}"
    pipe.save_pretrained(diffusers_dir, safe_serialization=True)
    original = {**unet_to_original(unet), **vae_to_original(vae), **text_encoders_to_original(family, text_encoders)}
    single_file = tmp_path / f"tiny_{family}.safetensors"
    save_file({key: value.contiguous() for key, value in original.items()}, single_file)
    config_dir = tmp_path / f"tiny_{family}_configs"
    for name in CONFIG_FILES:
        if (diffusers_dir / name).is_file():
            (config_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(diffusers_dir / name, config_dir / name)
    return TinySD(family, diffusers_dir, single_file, config_dir)


def tiny_clip(model_class: type, hidden_act: str, folder: str) -> CLIPTextModel:
    """A 2-layer CLIP text model over the real 49,408-token vocabulary."""
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TE_HIDDEN[folder], intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=TE2_PROJECTION,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return model_class(config).eval()


def tokenizer(pad_token: str) -> CLIPTokenizer:
    """The shipped CLIP tokenizer with the family's padding token."""
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=pad_token)


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Run a test module on one torch thread: tiny models are much faster so on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
