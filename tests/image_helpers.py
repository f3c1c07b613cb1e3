"""Helpers of the image-task tests: small image datasets, configs on tiny pipelines, in-process runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_scripts.checkpoint import load_trainable_state
from lora_scripts.config import TrainConfig, load_config
from lora_scripts.loop import TrainResult, train
from lora_scripts.tasks.image import load_model
from lora_scripts.tasks.image_model import SDLoRAModel, add_sd_lora
from tests.helpers import write_config

CAPTIONS = ["ink wash painting, mountain", "ink wash painting, river", "pastel color palette, bridge",
            "delicate linework, boat", "ink wash painting, pine tree", "pastel color palette, moon"]


def save_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth random picture (noise at low resolution, upsampled) of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


def write_dataset(folder: Path, sizes: list[tuple[int, int]], csv: bool = True) -> Path:
    """Images img0.png… of the given sizes with captions, in a metadata.csv or as .txt files."""
    rows = ["filename,prompt"]
    for i, size in enumerate(sizes):
        save_image(folder / f"img{i}.png", size, seed=i)
        caption = CAPTIONS[i % len(CAPTIONS)]
        rows.append(f'img{i}.png,"{caption}"')
        if not csv:
            (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    if csv:
        (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def image_config(tmp_path: Path, base_model: Path, name: str = "config.yaml", **overrides) -> Path:
    """A fast config: 32 px buckets (16x16 latents on the tiny VAE), rank 4, constant lr, no checkpoints."""
    keys = dict(
        base_model=str(base_model), train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
        bucket_reso_steps=32, lora_rank=4, batch_size=2, epochs=1, learning_rate=1e-2, lr_scheduler="constant",
        save_steps=0, logging_steps=1, seed=0,
    )
    keys.update(overrides)
    return write_config(tmp_path / name, **keys)


def train_in_process(config: Path, *overrides: str) -> TrainResult:
    """`lora-scripts train --config CONFIG --set …` in this process (saves the import time)."""
    return train(load_config(config, list(overrides)))


def trained_model(cfg: TrainConfig, checkpoint: Path) -> SDLoRAModel:
    """The model as it was at a checkpoint: base weights plus the LoRA parameters the loop saved."""
    _, model, _ = load_model(cfg, "cpu")
    add_sd_lora(model, cfg)
    load_trainable_state(model, load_file(checkpoint / "lora_params.safetensors"))
    return model.eval()


def max_change(after: list[torch.Tensor], before: list[torch.Tensor]) -> list[float]:
    """Largest absolute difference per output."""
    return [float((a - b).abs().max()) for a, b in zip(after, before)]
