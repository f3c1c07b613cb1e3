"""The image benchmark's model, pictures and rows (each row run in a fresh process by `bench/row.py`).

The baseline is a loop written the way diffusers' `examples/text_to_image/train_text_to_image_lora.py`
trains: every step decodes the pictures, resizes the shorter side to the resolution (bilinear),
centre-crops a square, encodes it with the VAE (`latent_dist.sample()`) and the caption with the
text encoder, then trains the UNet's PEFT LoRA on the noise-prediction MSE. The one change: it
adapts the same modules as lora-scripts (kohya's set; the script itself adapts only to_q/k/v/out),
with PEFT's default init, so both train the same LoRA.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench.common import StepClock, peak_device_mib, peak_rss_mib, wall_time
from lora_scripts.models.sd import ASSETS, CLIP_TOKENIZER_DIR, sd_target_modules

# Modules whose first call marks the start of a step's compute (VAE, text encoder or UNet).
COMPUTE_MODULES = (nn.Conv2d, nn.Linear, nn.Embedding)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_sd1_model(folder: Path, width_divisor: int) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights, saved as a diffusers folder.

    Depth, block types, head size and the VAE's 8x downsampling are SD1.5's (from the configs
    shipped in lora_scripts/assets/sd/sd1); every channel width is divided by `width_divisor`
    (1: the real size), so the VAE : text encoder : UNet cost ratio stays close to SD1.5's.
    """
    sd1 = ASSETS / "sd" / "sd1"
    groups = 32 // width_divisor if 32 % width_divisor == 0 else 1

    def narrow(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "block_out_channels": [c // width_divisor for c in config["block_out_channels"]], "norm_num_groups": groups}

    torch.manual_seed(0)
    unet_config = narrow(dict(UNet2DConditionModel.load_config(sd1, subfolder="unet")))
    # Heads as wide as SD1.5's (40/80/160 channels): with fewer channels that means fewer heads.
    heads = [max(1, c // h) for c, h in zip(unet_config["block_out_channels"], (40, 80, 160, 160))]
    unet = UNet2DConditionModel.from_config({**unet_config, "cross_attention_dim": 768 // width_divisor, "attention_head_dim": heads})
    vae = AutoencoderKL.from_config(narrow(dict(AutoencoderKL.load_config(sd1, subfolder="vae"))))
    text_config = CLIPTextConfig.from_pretrained(sd1 / "text_encoder")
    text_config.hidden_size //= width_divisor
    text_config.intermediate_size //= width_divisor
    text_config.projection_dim //= width_divisor
    text_encoder = CLIPTextModel(text_config).eval()
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(sd1, subfolder="scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token="<|endoftext|>")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` smooth random JPEG pictures of `size` (quality 90) and a metadata.csv."""
    folder.mkdir(parents=True)
    rows = ["filename,prompt"]
    for i in range(count):
        coarse = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:03d}.jpg", quality=90)
        rows.append(f'{i:03d}.jpg,"ink wash painting, scene {i}"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


class Baseline:
    """The diffusers-style training set-up: components loaded from the folder, LoRA on the UNet."""

    def __init__(self, spec: dict[str, Any]) -> None:
        folder, dtype, device = spec["model"], DTYPES[spec["precision"]], spec["device"]
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype).to(device)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
        for part in (self.unet, self.vae, self.text_encoder):
            part.requires_grad_(False)
        torch.manual_seed(spec["seed"])
        self.unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], target_modules=sd_target_modules(self.unet)))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for param in self.params:  # the script's cast_training_params: LoRA weights train in float32
            param.data = param.data.float()
        self.autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def pixels(self, path: Path, resolution: int) -> torch.Tensor:
        """transforms.Resize(resolution) (bilinear, shorter side), CenterCrop, ToTensor, Normalize([0.5], [0.5])."""
        image = Image.open(path).convert("RGB")
        width, height = image.size
        size = (resolution, int(resolution * height / width)) if width <= height else (int(resolution * width / height), resolution)
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = round((image.width - resolution) / 2), round((image.height - resolution) / 2)
        image = image.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2.0 - 1.0

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids

    def loss(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The script's loss: noise, then timesteps, from torch's global RNG; mean MSE over the batch."""
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _photo_rows(folder: Path) -> list[tuple[Path, str]]:
    lines = (folder / "metadata.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [(folder / line.split(",", 1)[0], line.split(",", 1)[1].strip('"')) for line in lines]


def run_diffusers_style(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline's timed run: `epochs` shuffled epochs, everything recomputed every step."""
    base = Baseline(spec)
    photos = _photo_rows(Path(spec["data"]))
    device, batch_size = spec["device"], spec["batch"]
    optimizer = torch.optim.AdamW(base.params, lr=spec["lr"])
    generator = torch.Generator().manual_seed(spec["seed"])
    base.unet.train()
    with StepClock(COMPUTE_MODULES) as clock:
        for _ in range(spec["epochs"]):
            order = torch.randperm(len(photos), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                chosen = [photos[i] for i in order[start : start + batch_size]]
                pixels = torch.stack([base.pixels(path, spec["resolution"]) for path, _ in chosen])
                ids = base.token_ids([caption for _, caption in chosen])
                with base.autocast:
                    latents = base.vae.encode(pixels.to(device, base.vae.dtype)).latent_dist.sample() * base.vae.config.scaling_factor
                    hidden = base.text_encoder(ids.to(device), return_dict=False)[0]
                    loss = base.loss(latents, hidden)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(base.params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return _result(clock, spec, len(photos))


def run_lora_scripts(spec: dict[str, Any]) -> dict[str, Any]:
    """lora-scripts through `train(load_config(...))`: caches filled at start-up, then bucketed steps."""
    from lora_scripts.config import load_config
    from lora_scripts.loop import train

    cfg = load_config(spec["config"], spec.get("overrides", []))
    with StepClock(COMPUTE_MODULES) as clock:
        train(cfg)
    return _result(clock, spec, len(_photo_rows(Path(spec["data"]))))


def _result(clock: StepClock, spec: dict[str, Any], images: int) -> dict[str, Any]:
    """Images/s and the waiting share over the last epoch (epoch 2 of 2); time to the first step done."""
    per_epoch = len(clock.ends) // spec["epochs"]
    first, last = len(clock.ends) - per_epoch, len(clock.ends) - 1
    seconds = clock.ends[last] - clock.ends[first - 1]
    cpu_seconds = clock.cpu[clock.ends[last]] - clock.cpu[clock.ends[first - 1]]
    return {
        "steps_per_epoch": per_epoch, "epoch_s": seconds, "images_per_s": images / seconds, "s_per_step": seconds / per_epoch,
        "images_per_cpu_s": images / cpu_seconds,
        "data_share": clock.waiting_share(first, last), "first_step_done_s": wall_time(clock.ends[0]) - spec["spawned_at"],
        "peak_rss_mib": peak_rss_mib(), "peak_device_mib": peak_device_mib(),
    }


@torch.no_grad()
def check_step1_parity(spec: dict[str, Any]) -> dict[str, Any]:
    """Step 1's loss from lora-scripts and from the baseline on identical inputs.

    lora-scripts is built as `train()` builds it (caches filled, LoRA attached and fused) and its
    first micro-batch's loss computed with gradients on, as in training. The baseline loads its
    own components, gets lora-scripts' LoRA weights (so the weights are the same), encodes the
    same pixels (the bucket crop lora-scripts trained on) with its VAE, using the posterior mean
    as lora-scripts' cache does, and the captions with its text encoder. Both losses then run
    after torch.manual_seed(seed), so noise and timesteps are the same draws (for latents of the
    same memory layout).
    """
    from lora_scripts.config import load_config
    from lora_scripts.data.image_pixels import training_pixels
    from lora_scripts.models.lora_delta import fuse_lora_layers
    from lora_scripts.tasks import get_task

    cfg = load_config(spec["config"], spec.get("overrides", []))
    task = get_task(cfg.task_type).build(cfg, spec["device"])
    if cfg.fused_lora:
        fuse_lora_layers(task.model)
    samples = [task.train_set[i] for i in task.batcher(0)[0]]
    batch = task.collate(samples)
    torch.manual_seed(spec["seed"])
    with torch.enable_grad():  # as in training: fused LoRA layers compute only where gradients are wanted
        ours = float(task.loss(task.model, batch)) / len(samples)

    base = Baseline(spec)
    set_peft_model_state_dict(base.unet, get_peft_model_state_dict(task.model.unet))
    pixels = torch.stack([training_pixels(s.record.path, s.placement, s.placement.center_crop, False) for s in samples])
    # The VAE returns channels-last latents and torch.randn_like follows the memory layout, so one
    # seed gives the same noise only for the same layout: the cache holds contiguous latents.
    latents = (base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor).contiguous()
    hidden = base.text_encoder(base.token_ids([s.record.caption for s in samples]), return_dict=False)[0]
    torch.manual_seed(spec["seed"])
    theirs = float(base.loss(latents, hidden))
    return {
        "loss_lora_scripts": ours, "loss_baseline": theirs, "relative_difference": abs(ours - theirs) / max(abs(theirs), 1e-12),
        "latents_max_difference": float((latents - batch["latents"]).abs().max()),
        "text_max_difference": float((hidden - batch["prompt_embeds"]).abs().max()),
        "bucket": list(samples[0].placement.bucket),
    }



def unet_step_flops(folder: Path, resolution: int, batch: int, device: str, dtype: torch.dtype) -> float:
    """FLOPs of one UNet LoRA training step (forward and backward) on `batch` latents of a
    resolution x resolution picture, as torch's FlopCounterMode counts them (matmuls,
    convolutions, attention): what the hardware computes, frozen weights getting no gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=sd_target_modules(unet)))
    downsample = 2 ** (len(AutoencoderKL.load_config(folder, subfolder="vae")["block_out_channels"]) - 1)
    side = resolution // downsample
    latents = torch.randn(batch, unet.config.in_channels, side, side, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, hidden).sample.float().square().mean().backward()
    return float(counter.get_total_flops())
