"""Move a Stable Diffusion LoRA between kohya's layout (A1111, ComfyUI) and diffusers', losslessly.

- kohya: one `.safetensors`, modules `lora_unet_…` / `lora_te_…` (`lora_te1_`/`lora_te2_` for
  SDXL, whose UNet names are SGM ones) with `lora_down`, `lora_up` and a 0-d `alpha`, plus
  `ss_*` / `modelspec.*` metadata.
- diffusers: `pytorch_lora_weights.safetensors` as `save_lora_weights` writes it: PEFT keys
  `unet.<path>.lora_A.weight` / `text_encoder(_2).text_model.<path>.lora_B.weight`, and each
  component's LoraConfig (r, lora_alpha, rank_pattern, alpha_pattern, target_modules) under the
  `lora_adapter_metadata` header key, which `load_lora_weights` turns back into the adapter's
  scales: the way diffusers' own training scripts round-trip alpha.
The tensors are copied unchanged. kohya's metadata rides along in the diffusers file's header
(diffusers ignores it), with the alphas' dtype when it is not float32, so kohya → diffusers →
kohya gives back the same tensors and metadata (hashes recomputed; an absent alpha comes back as
alpha = rank, the value loaders assume). The family decides SDXL's SGM names: from `--family`,
else `--base`, else the file (metadata, module names, layer widths).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import diffusers_module_path, kohya_module_name, save_kohya_lora
from lora_scripts.export.lora_files import (
    DIFFUSERS_WEIGHTS,
    LoraSource,
    image_family,
    load_tensors,
    module_scale,
    open_lora,
)
from lora_scripts.export.merge_image import default_layers_per_block, plain_lora_modules
from lora_scripts.models.sd_detect import check_family, detect_sd_family, read_json

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py
ALPHA_DTYPE_KEY = "lora_scripts.kohya_alpha_dtype"
ALPHA_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_image_lora(lora: Path, to: str, out: Path, family: str | None = None,
                       base: Path | None = None) -> tuple[LoraSource, Path, int]:
    """Convert the LoRA at `lora` to the `to` layout at `out`; returns (source, file written, modules).

    Raises UserError, writing nothing, when `out` exists, the file is unreadable, not an SD LoRA,
    already in that layout, of an unknown family, or holds modules the other layout cannot.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing was written)")
    source = open_lora(lora)
    if source.format not in ("kohya", "diffusers"):
        raise UserError(f"{lora} is a {source.format} adapter; convert moves Stable Diffusion LoRAs between kohya and diffusers")
    if source.format == to:
        raise UserError(f"{lora} is already a {to} LoRA; nothing to convert")
    if to == "kohya" and out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out}: a kohya LoRA is one .safetensors file; give a name ending in .safetensors")
    family = lora_family(source, family, base)
    layers_per_block = (read_json(base / "unet" / "config.json")["layers_per_block"] if base and base.is_dir()
                        else default_layers_per_block(family))
    if to == "diffusers":
        state, metadata = kohya_to_diffusers(source, family, layers_per_block)
        folder, name = (out.parent, out.name) if out.suffix.lower() == ".safetensors" else (out, DIFFUSERS_WEIGHTS)
        write_atomically(folder, lambda tmp: save_file(state, tmp / name, metadata=metadata))
        return source, folder / name, len(state) // 2
    state, metadata = diffusers_to_kohya(source, family, layers_per_block)
    save_kohya_lora(out, state, metadata)
    return source, out, len(state) // 3


def lora_family(source: LoraSource, family: str | None, base: Path | None) -> str:
    """The SD family the LoRA is for: `family`, else the base's, else what the file says."""
    if family:
        return check_family(family)
    if base is not None:
        return detect_sd_family(base)
    found, _ = image_family(source, plain_lora_modules(source))
    if found is None:
        raise UserError(f"{source.path}: cannot tell which Stable Diffusion family this LoRA is for; "
                        f"pass --family sd1|sd2|sdxl or --base MODEL")
    return found


def kohya_to_diffusers(source: LoraSource, family: str, layers_per_block: int) -> tuple[dict, dict[str, str]]:
    """A kohya LoRA's tensors under diffusers' PEFT keys, and the header metadata to write."""
    tensors = load_tensors(source)
    state: dict[str, torch.Tensor] = {}
    components: dict[str, dict[str, tuple[int, float]]] = {}  # component -> path -> (rank, alpha)
    alpha_dtypes = set()
    for module in plain_lora_modules(source):
        located = diffusers_module_path(module.name, family, layers_per_block)
        if located is None:
            raise UserError(f"{source.path}: module {module.name} is not an attention/MLP layer of an {family} "
                            f"model as kohya names them; pass the family the LoRA was trained for with --family "
                            f"(layers outside kohya's default set are not converted)")
        component, path = located
        key = f"{component}.{path}" if component == "unet" else f"{component}.text_model.{path}"
        state[f"{key}.lora_A.weight"] = tensors[module.keys["down"]]
        state[f"{key}.lora_B.weight"] = tensors[module.keys["up"]]
        components.setdefault(component, {})[path] = (module.rank, module.alpha if module.alpha is not None else float(module.rank))
        if "alpha" in module.keys:
            alpha_dtypes.add(tensors[module.keys["alpha"]].dtype)
    adapter_metadata = {f"{component}.{key}": value for component, modules in components.items()
                        for key, value in lora_config(modules).items()}
    # diffusers write_lora_layers: json.dumps(metadata, indent=2, sort_keys=True) beside "format": "pt"
    metadata = {**source.metadata, "format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    if len(alpha_dtypes) == 1 and (dtype := alpha_dtypes.pop()) in ALPHA_DTYPES.values():
        metadata[ALPHA_DTYPE_KEY] = str(dtype).removeprefix("torch.")
    return state, metadata


def lora_config(modules: dict[str, tuple[int, float]]) -> dict:
    """One component's LoraConfig as diffusers saves it: the commonest rank and alpha, the rest as
    per-module patterns (the same split diffusers' get_peft_kwargs makes from kohya alphas)."""
    rank = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(modules),
        rank_pattern={path: r for path, (r, _) in modules.items() if r != rank},
        alpha_pattern={path: a for path, (_, a) in modules.items() if a != alpha},
    ).to_dict()
    return {**config, "target_modules": sorted(config["target_modules"])}


def diffusers_to_kohya(source: LoraSource, family: str, layers_per_block: int) -> tuple[dict, dict[str, str]]:
    """A diffusers LoRA's tensors under kohya names with their alphas, and kohya's metadata."""
    tensors = load_tensors(source)
    alpha_dtype = ALPHA_DTYPES.get(source.metadata.get(ALPHA_DTYPE_KEY, ""), torch.float32)
    state: dict[str, torch.Tensor] = {}
    for module in plain_lora_modules(source):
        component, _, path = module.name.partition(".")
        path = path.removeprefix("text_model.")
        try:
            name = kohya_module_name(component, path, family, layers_per_block)
        except (KeyError, ValueError):
            name = None
        if name is None or diffusers_module_path(name, family, layers_per_block) != (component, path):
            raise UserError(f"{source.path}: module {module.name} is not an attention/MLP layer of an {family} "
                            f"model that kohya's LoRA adapts; pass the family the LoRA was trained for with --family")
        state[f"{name}.lora_down.weight"] = tensors[module.keys["down"]]
        state[f"{name}.lora_up.weight"] = tensors[module.keys["up"]]
        # kohya scales by alpha / rank: this alpha gives diffusers' scale (rsLoRA included)
        state[f"{name}.alpha"] = torch.tensor(module_scale(source, module) * module.rank, dtype=alpha_dtype)
    dropped = {"format", LORA_ADAPTER_METADATA_KEY, ALPHA_DTYPE_KEY}
    return state, {key: value for key, value in source.metadata.items() if key not in dropped}
