"""Test helper: real LoRA files to inspect, resize and merge, made by the project's kohya/diffusers
exporters on the tiny SD1 pipeline and by PEFT on the tiny Llama."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_scripts.export.kohya import (
    LoraTrainingFacts,
    kohya_metadata,
    lora_layers,
    peft_to_kohya_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from lora_scripts.models.sd import load_sd_components, sd_target_modules
from tests.tiny_sd import make_tiny_sd

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@dataclass
class ImageLoras:
    """Two kohya LoRAs (A: LoCon, unet rank 4 / alpha 8, te rank 2 / alpha 3; B: unet rank 2 /
    alpha 1, te rank 3 / alpha 6, same modules) and A as a diffusers folder, on one tiny SD1."""

    base: Path  # diffusers folder
    kohya_a: Path
    kohya_b: Path
    diffusers_a: Path
    layer_counts: dict[str, int]  # group -> modules, conv 3x3 modules under "conv3x3"


def resnet_convs(unet: torch.nn.Module) -> list[str]:
    """The ResNet 3x3 convs kohya's LoCon (conv_dim) adapts: conv1/conv2 of every ResNet block."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and ".resnets." in name]


def make_image_loras(folder: Path) -> ImageLoras:
    """Wrap the tiny SD1 with PEFT LoRA (random non-zero up weights) and save it through the exporters."""
    tiny = make_tiny_sd(folder, "sd1")
    paths = {}
    for label, seed, (unet_rank, unet_alpha), (te_rank, te_alpha) in [("a", 1, (4, 8), (2, 3)), ("b", 2, (2, 1), (3, 6))]:
        components = load_sd_components(tiny.diffusers_dir)
        unet, encoders = components.unet, components.text_encoders
        convs = resnet_convs(unet)
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=unet_rank, lora_alpha=unet_alpha, init_lora_weights="gaussian",
                                    target_modules=sd_target_modules(unet) + convs))
        encoders[0].add_adapter(LoraConfig(r=te_rank, lora_alpha=te_alpha, init_lora_weights="gaussian",
                                           target_modules=sd_target_modules(encoders[0])))
        for model in (unet, *encoders):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(0, 0.1)
        facts = LoraTrainingFacts(
            family="sd1", output_name=f"style_{label}", base_model=str(tiny.single_file), network_dim=unet_rank,
            network_alpha=unet_alpha, resolution=(64, 64), learning_rate=1e-4, steps=120, epoch=3, seed=seed,
            training_started_at=time.time() - 90, training_finished_at=time.time(),
        )
        paths[label] = folder / f"style_{label}.safetensors"
        save_kohya_lora(paths[label], peft_to_kohya_state_dict(unet, encoders, "sd1"), kohya_metadata(facts))
        if label == "a":
            save_diffusers_lora(folder / "style_a_diffusers", unet, encoders)
            counts = {"unet": len(lora_layers(unet)), "te": len(lora_layers(encoders[0])), "conv3x3": len(convs)}
    return ImageLoras(tiny.diffusers_dir, paths["a"], paths["b"], folder / "style_a_diffusers", counts)


def make_peft_adapter(base: Path, out: Path, seed: int = 0, **config) -> Path:
    """A PEFT adapter on the tiny Llama with random non-zero lora_B, as training leaves it."""
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TEXT_TARGETS, task_type="CAUSAL_LM", **config))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Every module's update alpha / rank * up @ down (float64, convs flattened to [out, in*kh*kw]),
    straight from the file's tensors."""
    state = {key: value.double() for key, value in load_file(path).items()}
    deltas = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            rank = down.shape[0]
            up = state[f"{name}.lora_up.weight"].reshape(-1, rank)
            deltas[name] = float(state[f"{name}.alpha"]) / rank * up @ down.reshape(rank, -1)
    return deltas


def peft_deltas(folder: Path, alpha: float) -> dict[str, torch.Tensor]:
    """Every module's alpha / r * B @ A of a PEFT folder with one r / lora_alpha (no patterns)."""
    state = {key: value.double() for key, value in load_file(folder / "adapter_model.safetensors").items()}
    deltas = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            deltas[name] = alpha / a.shape[0] * state[f"{name}.lora_B.weight"] @ a
    return deltas
