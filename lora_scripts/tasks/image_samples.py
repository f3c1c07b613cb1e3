"""Render prompts with a (LoRA-wrapped) Stable Diffusion model: sample grids while training and
`lora-scripts generate`.

Prompts may carry kohya's sample options after the text (sd-scripts `library/train_util.py`
sample_images): `--n` negative prompt, `--w`/`--h` size, `--s` steps, `--l` guidance scale,
`--d` seed. Images are denoised by the diffusers pipeline of the family with an Euler sampler and
decoded by our VAE in its own dtype (a float32 VAE next to a float16 UNet works).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.models.sd import SDComponents
from lora_scripts.tracking import Tracker

GUIDANCE_SCALE = 7.5  # diffusers' and kohya's default
_OPTION_START = re.compile(r"\s--(?=[a-z]\b)")
_OPTION_TYPES = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
                 "l": ("guidance", float), "d": ("seed", int)}


@dataclass(frozen=True)
class SamplePrompt:
    """One image to render; unset options fall back to the run's defaults."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float = GUIDANCE_SCALE
    seed: int | None = None


def parse_prompt(line: str) -> SamplePrompt:
    """A prompt with optional kohya options, e.g. `ink wash cat --n blurry --w 768 --d 7`.

    Raises UserError for an unknown option or a value of the wrong type.
    """
    text, *options = _OPTION_START.split(" " + line.strip())
    values: dict[str, object] = {}
    for option in options:
        letter, _, value = option.partition(" ")
        if letter not in _OPTION_TYPES:
            raise UserError(f"sample prompt {line!r}: unknown option --{letter}; use --n, --w, --h, --s, --l or --d")
        name, kind = _OPTION_TYPES[letter]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise UserError(f"sample prompt {line!r}: --{letter} needs a {kind.__name__}, got {value.strip()!r}") from None
    return SamplePrompt(text.strip(), **values)


def read_sample_prompts(value: list[str] | Path | None) -> list[SamplePrompt]:
    """The config's sample_prompts: a list, or a text file (one per line, `#` comments skipped)."""
    if value is None:
        return []
    if isinstance(value, Path):
        if not value.is_file():
            raise UserError(f"sample_prompts file {value} does not exist; fix the path or list prompts in the config")
        lines = value.read_text(encoding="utf-8-sig").splitlines()
        value = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [parse_prompt(line) for line in value]


def make_pipeline(components: SDComponents) -> DiffusionPipeline:
    """The family's diffusers pipeline around these (possibly LoRA-wrapped) modules, Euler sampler."""
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    encoders, tokenizers = components.text_encoders, components.tokenizers
    if components.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, unet=components.unet, scheduler=scheduler, text_encoder=encoders[0],
            text_encoder_2=encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae, unet=components.unet, scheduler=scheduler, text_encoder=encoders[0],
            tokenizer=tokenizers[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe: DiffusionPipeline, prompts: list[SamplePrompt], size: int, steps: int, seed: int) -> list[Image.Image]:
    """One image per prompt; prompt i without `--d` uses seed + i (a CPU generator, so the same
    seed gives the same start noise on any device). Global RNG states are left untouched."""
    images = []
    for i, item in enumerate(prompts):
        generator = torch.Generator().manual_seed(item.seed if item.seed is not None else seed + i)
        latents = pipe(
            item.prompt, negative_prompt=item.negative or None, width=item.width or size, height=item.height or size,
            num_inference_steps=item.steps or steps, guidance_scale=item.guidance, generator=generator,
            output_type="latent",
        ).images
        images += decode(pipe.vae, latents)
    return images


def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images of UNet-space latents, decoded in the VAE's dtype without autocast."""
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in array]


def image_strip(images: list[Image.Image]) -> Image.Image:
    """The images side by side on a white canvas (sizes may differ)."""
    canvas = Image.new("RGB", (sum(image.width for image in images), max(image.height for image in images)), "white")
    left = 0
    for image in images:
        canvas.paste(image, (left, 0))
        left += image.width
    return canvas


class SampleRenderer:
    """Renders the sample prompts with the model being trained: `output_dir/samples/step_{N}.png`
    (the images side by side), also logged to TensorBoard as the `samples` image."""

    def __init__(self, components: SDComponents, model: torch.nn.Module, prompts: list[SamplePrompt],
                 output_dir: Path, size: int, steps: int, seed: int) -> None:
        self.components, self.model, self.prompts = components, model, prompts
        self.folder = output_dir / "samples"
        self.size, self.steps, self.seed = size, steps, seed

    def __call__(self, step: int, tracker: Tracker) -> Path:
        """Render every prompt at this step; returns the PNG written."""
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout while sampling
        try:
            images = render(make_pipeline(self.components), self.prompts, self.size, self.steps, self.seed)
        finally:
            self.model.train(was_training)
        strip = image_strip(images)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step}.png"
        write_atomically(self.folder, lambda tmp: strip.save(tmp / path.name))
        tracker.log_image(step, "samples", np.asarray(strip))
        return path
