"""`lora-scripts generate` for image LoRAs: the base model plus the trained LoRA at a strength,
as `<lora:my_style_lora:0.8>` in AUTOMATIC1111 (the LoRA's update is scaled by the strength)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_scripts.atomic import write_atomically
from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.models.precision import compute_dtype
from lora_scripts.export.kohya import load_kohya_into_peft, lora_layers
from lora_scripts.models.sd import SDComponents, load_sd_components
from lora_scripts.models.sd_detect import training_resolution
from lora_scripts.tasks.base import GenerateRequest
from lora_scripts.tasks.image_model import attach_adapters
from lora_scripts.tasks.image_samples import make_pipeline, parse_prompt, render

ADAPTER_NAME = "lora"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def find_lora(cfg: TrainConfig, adapter: Path) -> Path:
    """The LoRA to load from `adapter`: a kohya `.safetensors` file, a diffusers LoRA folder, or an
    output folder holding `<output_name>.safetensors`. Raises UserError when there is none."""
    if adapter.is_file():
        return adapter
    for candidate in (adapter / f"{cfg.effective_output_name}.safetensors", adapter / DIFFUSERS_LORA_FILE):
        if candidate.is_file():
            return candidate
    raise UserError(f"no trained LoRA in {adapter} (looked for {cfg.effective_output_name}.safetensors and {DIFFUSERS_LORA_FILE}); train first or pass --adapter FILE")


def generate_images(cfg: TrainConfig, prompts: list[str], lora_scale: float, out_dir: Path, steps: int, seed: int,
                    adapter: Path | None) -> list[Path]:
    """Render each prompt (kohya's --n/--w/--h/--s/--l/--d options allowed) with the LoRA found in
    `adapter` at `lora_scale` (None: the base model alone); write `out_dir/NN-words.png` and
    return the paths. Prompt i uses seed + i, so strength 0 reproduces the base model's image."""
    components = load_sd_components(cfg.base_model, cfg.model_family, cfg.allow_unsafe_pickle, torch.float32, cfg.model_config_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype(cfg.mixed_precision, device)
    for part in (components.unet, *components.text_encoders):
        part.to(device, dtype)
    components.vae.to(device)  # decoded in float32: SDXL's VAE overflows in fp16
    pipe = make_pipeline(components)
    if adapter is not None and cfg.network_type != "lora":
        attach_lycoris(cfg, components, find_lora(cfg, adapter), lora_scale)
    elif adapter is not None:
        lora = find_lora(cfg, adapter)
        try:
            pipe.load_lora_weights(str(lora), adapter_name=ADAPTER_NAME)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{lora} does not fit base_model {cfg.base_model} ({' '.join(str(exc).split())[:200]})") from None
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[lora_scale])
    resolution = training_resolution(cfg.resolution, components.family)
    images = render(pipe, [parse_prompt(prompt) for prompt in prompts], resolution, steps, seed)
    paths = [out_dir / f"{i:02d}-{slug(prompt)}.png" for i, prompt in enumerate(prompts)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir, lambda tmp: [image.save(tmp / path.name) for image, path in zip(images, paths)])
    return paths


def attach_lycoris(cfg: TrainConfig, components: SDComponents, lora: Path, lora_scale: float) -> None:
    """Put a LoHa / LoKr file (which diffusers cannot load) on the pipeline's models the way the
    run trained it (PEFT layers from the config, weights from the file), its update x lora_scale."""
    encoders = components.text_encoders
    attach_adapters(components.unet, encoders if cfg.train_text_encoder else [], cfg)
    load_kohya_into_peft(load_file(str(lora)), components.unet, encoders, components.family, str(lora))
    for model in (components.unet, *encoders):
        for _, layer in lora_layers(model):
            layer.scaling["default"] *= lora_scale


def generate(cfg: TrainConfig, request: GenerateRequest) -> list[str]:
    """`lora-scripts generate` for images: render the prompts with the LoRA; the PNG paths."""
    steps = request.steps or cfg.sample_steps
    seed = cfg.seed if request.seed is None else request.seed
    out_dir = request.out_dir or cfg.output_dir / "generated"
    return [str(path) for path in generate_images(cfg, request.prompts, request.lora_scale, out_dir, steps, seed, request.adapter)]


def slug(prompt: str, words: int = 6) -> str:
    """A file-name-safe short form of a prompt's first words."""
    text = re.sub(r"\s--[a-z]\s.*$", "", prompt)
    return "-".join(re.findall(r"\w+", text.lower())[:words]) or "image"
