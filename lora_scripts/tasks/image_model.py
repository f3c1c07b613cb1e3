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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from peft import LoraConfig
from torch import nn

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.models.sd import SDComponents, sd_target_modules
from lora_scripts.tasks.base import Batch


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

        Noise and timesteps come from torch's global RNG, which the loop saves for exact resumes.
        """
        latents = batch["latents"] if "latents" in batch else self.encode_pixels(batch["pixels"])
        if "prompt_embeds" in batch:
            embeds, pooled = batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
        else:
            with torch.set_grad_enabled(self.settings.train_text_encoder and torch.is_grad_enabled()):
                embeds, pooled = self.encode_text([batch[f"input_ids_{i}"] for i in range(len(self.text_encoders))])
        noise = torch.randn_like(latents)
        if self.settings.noise_offset:
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
            noise = noise + self.settings.noise_offset * offset
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
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
    """Freeze the base weights and add a fresh float32 LoRA to the UNet and, with
    `train_text_encoder`, to each text encoder. Returns (UNet modules, text-encoder modules)."""
    model.requires_grad_(False)
    counts = []
    trained = [model.unet, *(model.text_encoders if cfg.train_text_encoder else [])]
    for part in trained:
        targets = lora_targets(part, cfg.target_modules)
        if not targets:
            raise UserError(f"target_modules {cfg.target_modules} matches none of kohya's LoRA modules in the {type(part).__name__}; use names like to_q, to_k, to_v, to_out.0, proj_in, ff.net.2, q_proj, fc1")
        part.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets))
        counts.append(len(targets))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return counts[0], sum(counts[1:])


def param_groups(model: SDLoRAModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: UNet LoRA at learning_rate, text-encoder LoRA at text_encoder_lr."""
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    text = [p for p in model.text_encoders.parameters() if p.requires_grad]
    if text:
        groups.append({"params": text, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups
