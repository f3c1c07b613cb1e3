"""The Stable Diffusion model the loop trains: UNet, text encoder(s) and VAE with PEFT LoRA on
kohya's default modules. Its forward is the summed noise-prediction loss of a batch.

Loss as in kohya-ss sd-scripts `train_network.py` and diffusers' `train_text_to_image_lora.py`:
noise (plus `noise_offset` per channel) at a uniform random timestep, epsilon or v target,
per-image MSE, optional Min-SNR weighting (Hang et al. 2023, arXiv:2303.09556:
min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v). Text conditioning matches the diffusers
pipelines that render the result: SD1/SD2 use the encoder's last hidden state; SDXL concatenates
both encoders' penultimate hidden states and takes the pooled embedding from the second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from torch import nn

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.models.sd import SDComponents, sd_conv_target_modules, sd_target_modules
from lora_scripts.tasks.base import Batch
from lora_scripts.tasks.lora_plus import lora_param_groups


@dataclass(frozen=True)
class LossSettings:
    """The config keys the loss reads."""

    prediction_type: str
    train_text_encoder: bool
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None


class SDLoRAModel(nn.Module):
    """UNet + text encoder(s) + VAE of one pipeline; only the LoRA weights require grad."""

    def __init__(self, components: SDComponents, settings: LossSettings) -> None:
        super().__init__()
        self.unet = components.unet
        self.text_encoders = nn.ModuleList(components.text_encoders)
        self.vae = components.vae
        self.family = components.family
        self.noise_scheduler = components.noise_scheduler
        self.settings = settings

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (posterior mean) of pixels in [-1, 1], computed in the VAE's own dtype.

        The mean rather than a sample makes a latent a pure function of the image, so cached and
        freshly encoded latents agree.
        """
        with torch.autocast(pixels.device.type, enabled=False):
            latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    def encode_text(self, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embedding or None) as the family's pipeline computes them."""
        if self.family != "sdxl":
            return self.text_encoders[0](token_ids[0]).last_hidden_state, None
        hidden = []
        for encoder, ids in zip(self.text_encoders, token_ids):
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), output.text_embeds

    def forward(self, batch: Batch) -> torch.Tensor:
        """Sum over the batch of each image's (SNR-weighted) mean squared prediction error.

        Noise and timesteps come from each image's seed when the batch has `sample_seeds` (the
        loop's: the same draws however a batch is split over processes), else from torch's
        global RNG.
        """
        latents = batch["latents"] if "latents" in batch else self.encode_pixels(batch["pixels"])
        if "prompt_embeds" in batch:
            embeds, pooled = batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
        else:
            with torch.set_grad_enabled(self.settings.train_text_encoder and torch.is_grad_enabled()):
                embeds, pooled = self.encode_text([batch[f"input_ids_{i}"] for i in range(len(self.text_encoders))])
        if "sample_seeds" in batch:
            drawn = [self.draw_noise(latents[:1], torch.Generator(latents.device).manual_seed(seed)) for seed in batch["sample_seeds"].tolist()]
            noise, timesteps = torch.cat([n for n, _ in drawn]), torch.cat([t for _, t in drawn])
        else:
            noise, timesteps = self.draw_noise(latents, None)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.settings.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        extra: dict[str, Any] = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        prediction = self.unet(noisy, timesteps, embeds, **extra).sample
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.settings.min_snr_gamma:
            snr = compute_snr(self.noise_scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.settings.min_snr_gamma)
            per_image = per_image * (clipped / (snr + 1) if self.settings.prediction_type == "v_prediction" else clipped / snr)
        return per_image.sum()

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise shaped as `latents` (plus noise_offset per channel) and a uniform timestep per image."""
        noise = torch.randn_like(latents) if generator is None else torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.settings.noise_offset:
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator, device=latents.device)
            noise = noise + self.settings.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        return noise, torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)


def tokenize(tokenizers: list, captions: list[str]) -> list[torch.Tensor]:
    """Token ids of each caption for each tokenizer, padded/cut to CLIP's 77 tokens."""
    return [
        tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]


def lora_targets(model: nn.Module, wanted: list[str] | None) -> list[str]:
    """kohya's default LoRA modules of `model`, narrowed to names ending in one of `wanted`."""
    names = sd_target_modules(model)
    if wanted:
        names = [name for name in names if any(name == w or name.endswith(f".{w}") for w in wanted)]
    return names


def add_sd_lora(model: SDLoRAModel, cfg: TrainConfig) -> tuple[int, int]:
    """Freeze the base weights and add a fresh float32 adapter to the UNet and, with
    `train_text_encoder`, to each text encoder. Returns (UNet modules, text-encoder modules)."""
    model.requires_grad_(False)
    counts = attach_adapters(model.unet, list(model.text_encoders) if cfg.train_text_encoder else [], cfg)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return counts


def attach_adapters(unet: nn.Module, text_encoders: list[nn.Module], cfg: TrainConfig) -> tuple[int, int]:
    """Add the configured adapter (`network_type`, ranks, LoCon conv set) to the UNet and the given
    text encoders, fresh; returns (UNet modules, text-encoder modules)."""
    counts = []
    for part in (unet, *text_encoders):
        targets = lora_targets(part, cfg.target_modules)
        if not targets:
            raise UserError(f"target_modules {cfg.target_modules} matches none of kohya's LoRA modules in the {type(part).__name__}; use names like to_q, to_k, to_v, to_out.0, proj_in, ff.net.2, q_proj, fc1")
        convs = sd_conv_target_modules(part) if cfg.conv_dim and part is unet else {}
        part.add_adapter(adapter_config(cfg, targets + list(convs), [path for path, is_3x3 in convs.items() if is_3x3]))
        counts.append(len(targets) + len(convs))
    return counts[0], sum(counts[1:])


def adapter_config(cfg: TrainConfig, targets: list[str], convs_3x3: list[str]) -> PeftConfig:
    """The PEFT config of `network_type` on `targets`: lora_rank / lora_alpha, and conv_dim /
    conv_alpha on the 3x3 convs (as PEFT rank and alpha patterns on their exact paths)."""
    exact = [re.escape(path) for path in convs_3x3]
    common: dict[str, Any] = dict(r=cfg.lora_rank, target_modules=targets, rank_pattern=dict.fromkeys(exact, cfg.conv_dim),
                                  alpha_pattern=dict.fromkeys(exact, cfg.conv_alpha or cfg.conv_dim))
    if cfg.network_type == "loha":
        return LoHaConfig(alpha=cfg.lora_alpha, **common)
    if cfg.network_type == "lokr":
        return LoKrConfig(alpha=cfg.lora_alpha, **common)
    return LoraConfig(lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, **common)


def param_groups(model: SDLoRAModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: UNet adapter at learning_rate, text-encoder adapter at text_encoder_lr;
    with loraplus_lr_ratio, each part's B (up) matrices at ratio x its rate."""
    groups = lora_param_groups(model.unet.named_parameters(), cfg.learning_rate, cfg.loraplus_lr_ratio)
    if cfg.train_text_encoder:
        text_lr = cfg.text_encoder_lr or cfg.learning_rate
        groups += lora_param_groups(model.text_encoders.named_parameters(), text_lr, cfg.loraplus_lr_ratio)
    return groups
