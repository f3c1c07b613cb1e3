"""Bake a Stable Diffusion LoRA (kohya or diffusers file) into its base model at a strength.

Two bases:
- a single-file SD1/SD2/SDXL checkpoint in the original (LDM/SGM) layout, written back in that
  layout so WebUI, ComfyUI and diffusers' `from_single_file` load it: every adapted weight
  becomes W + strength * scale * up @ down (scale = alpha / rank, as kohya's and A1111's loaders
  apply it). Module names map to checkpoint keys the way diffusers' `single_file_utils`
  converts the other way: SD1/SD2 kohya UNet names are diffusers paths (sent through
  `sgm_unet_path`, as A1111's `networks.py` and ComfyUI's `unet_to_diffusers` do), SDXL's are
  SGM paths already; CLIP-L keeps the Hugging Face layout under its prefix; OpenCLIP (SD2, SDXL's
  second encoder) fuses q, k, v into `attn.in_proj_weight` (thirds in that order), and names
  out_proj, fc1 and fc2 `attn.out_proj`, `mlp.c_fc` and `mlp.c_proj`.
- a diffusers folder: the pipeline's own `load_lora_weights` + `fuse_lora(lora_scale=strength)`,
  saved as a diffusers folder with each component in the dtype it was stored in.
Every LoRA module is first checked against the base; the first that has no layer there, or
another shape, is named in the error (a LoRA for another model family).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import diffusers_module_path, sgm_unet_path
from lora_scripts.export.lora_files import LoraModule, LoraSource, load_tensors, lora_modules, module_scale, open_lora
from lora_scripts.models.sd import ASSETS, FAMILY_CONFIG_DIRS
from lora_scripts.models.sd_detect import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT2_PREFIX,
    UNET_PREFIX,
    detect_checkpoint_family,
    detect_diffusers_family,
    open_safetensors,
    read_checkpoint,
    read_json,
)

OUT_FORMATS = ("single_file", "diffusers")
# where each text encoder sits in an original-layout checkpoint (diffusers single_file_utils)
HF_CLIP_PREFIXES = {("sd1", "text_encoder"): SD1_TEXT_PREFIX, ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {("sd2", "text_encoder"): SD2_TEXT_PREFIX, ("sd2_v", "text_encoder"): SD2_TEXT_PREFIX,
                      ("sdxl", "text_encoder_2"): SDXL_TEXT2_PREFIX}
OPEN_CLIP_LAYERS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
COMPONENT_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors")


@dataclass
class LoraUpdate:
    """One LoRA module as a weight update: where it goes in the pipeline, and its factors."""

    name: str  # as the file names it
    component: str  # unet, text_encoder, text_encoder_2
    path: str  # diffusers module path (text encoders without `text_model.`)
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the weight this update fits: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """scale * up @ down in float32, shaped like the weight (1x1 conv factors included)."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.down.shape[0], -1).float()
        return (self.scale * (up @ down)).reshape(self.delta_shape())


def merge_image_lora(base: Path, lora: Path, out: Path, strength: float, out_format: str) -> Path:
    """Merge an SD LoRA into `base` at `strength`; returns the written checkpoint file or folder.

    `base`: a single-file `.safetensors` checkpoint (→ out_format "single_file", same layout) or a
    diffusers folder (→ "diffusers"). `lora`: a kohya `.safetensors` or a diffusers LoRA file or
    folder. Raises UserError, writing nothing, when `out` exists, the formats do not go
    together, a file is unreadable, or the LoRA does not fit the base.
    """
    base, lora, out = Path(base), Path(lora), Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing was written)")
    if out_format not in OUT_FORMATS:
        raise UserError(f"unknown merge output format {out_format!r}; use one of {', '.join(OUT_FORMATS)}")
    if not math.isfinite(strength):
        raise UserError(f"merge strength must be a finite number, got {strength}")
    source = open_lora(lora)
    if source.format not in ("kohya", "diffusers"):
        raise UserError(f"{lora} is a {source.format} adapter, not a Stable Diffusion LoRA (kohya or diffusers)")
    if base.is_dir():
        if out_format != "diffusers":
            raise UserError(f"{base} is a diffusers folder, which merges into a diffusers folder; writing a "
                            f"single-file checkpoint from it is not supported (merge into the .safetensors checkpoint instead)")
        return merge_into_diffusers(base, source, out, strength)
    if out_format != "single_file":
        raise UserError(f"{base} is a single-file checkpoint, which merges into a single file; "
                        f"for a diffusers folder, merge into the diffusers copy of the model")
    if base.suffix.lower() != ".safetensors" or out.suffix.lower() != ".safetensors":
        raise UserError(f"single-file merge reads and writes .safetensors checkpoints (base {base.name}, out {out.name}); "
                        f"convert a pickle .ckpt to .safetensors first")
    return merge_into_checkpoint(base, source, out, strength)


def lora_updates(source: LoraSource, family: str, layers_per_block: int) -> list[LoraUpdate]:
    """Every module of a kohya or diffusers LoRA as a LoraUpdate located in a `family` pipeline."""
    tensors = load_tensors(source)
    updates = []
    for module in plain_lora_modules(source):
        if source.format == "kohya":
            located = diffusers_module_path(module.name, family, layers_per_block)
        else:
            component, _, path = module.name.partition(".")
            located = (component, path.removeprefix("text_model."))
        if located is None:
            raise mismatch(source, module.name, family, "no such layer")
        down, up = tensors[module.keys["down"]], tensors[module.keys["up"]]
        updates.append(LoraUpdate(module.name, *located, down, up, module_scale(source, module)))
    return updates


def plain_lora_modules(source: LoraSource) -> list[LoraModule]:
    """The modules of a LoRA file, refusing kinds other than plain LoRA (DoRA, LoHa, LoKr) and
    tensors that belong to no module, which merge and convert would otherwise drop."""
    modules = lora_modules(source)
    for module in modules:
        if module.kind != "lora" or module.dora:
            kind = "DoRA" if module.dora else module.kind
            raise UserError(f"{source.path}: module {module.name} is {kind}; only plain LoRA modules "
                            f"(lora_down/lora_up or lora_A/lora_B) can be merged or converted")
    stray = sorted(set(source.shapes) - {key for module in modules for key in module.keys.values()})
    if stray:
        raise UserError(f"{source.path}: tensor {stray[0]} belongs to no LoRA module; the file is not a plain LoRA")
    return modules


def default_layers_per_block(family: str) -> int:
    """The UNet's layers_per_block in the family's shipped config (2 in every SD1/SD2/SDXL): the
    layout kohya's SGM names assume."""
    return read_json(ASSETS / "sd" / FAMILY_CONFIG_DIRS[family] / "unet" / "config.json")["layers_per_block"]


def mismatch(source: LoraSource, name: str, family: str, why: str) -> UserError:
    """The error for a LoRA module the base has no place for."""
    return UserError(f"{source.path}: module {name} does not fit this {family} base ({why}); "
                     f"the LoRA was made for another model family, merge it into the base it was trained on")


def merge_into_checkpoint(base: Path, source: LoraSource, out: Path, strength: float) -> Path:
    """Add every update into an original-layout checkpoint's tensors and write them to `out`."""
    with open_safetensors(base) as handle:
        metadata = handle.metadata()
    checkpoint = read_checkpoint(base, allow_unsafe_pickle=False)
    family = detect_checkpoint_family(checkpoint.keys(), checkpoint.__getitem__, base)
    layers_per_block = default_layers_per_block(family)
    targets = []
    for update in lora_updates(source, family, layers_per_block):
        location = checkpoint_location(update, family, layers_per_block)
        weight = checkpoint.get(location[0]) if location else None
        if weight is None:
            raise mismatch(source, update.name, family, "no such layer")
        third = location[1]
        target = weight if third is None else weight.chunk(3)[third]
        if tuple(target.shape) != update.delta_shape():
            raise mismatch(source, update.name, family, f"LoRA shape {list(update.delta_shape())}, weight {list(target.shape)}")
        targets.append((target, update))
    with torch.no_grad():
        for target, update in targets:  # in place: a q/k/v third is a view into the fused in_proj
            target.copy_((target.float() + strength * update.delta()).to(target.dtype))
    write_atomically(out.parent, lambda tmp: save_file(checkpoint, tmp / out.name, metadata=metadata))
    return out


def checkpoint_location(update: LoraUpdate, family: str, layers_per_block: int) -> tuple[str, int | None] | None:
    """The original-layout key of an update's weight, and which third of a fused OpenCLIP q/k/v
    `in_proj_weight` it is (None: the whole tensor); None when the module has no place there."""
    if update.component == "unet":
        try:
            return f"{UNET_PREFIX}{sgm_unet_path(update.path, layers_per_block)}.weight", None
        except ValueError:
            return None
    if prefix := HF_CLIP_PREFIXES.get((family, update.component)):
        return f"{prefix}text_model.{update.path}.weight", None
    prefix = OPEN_CLIP_PREFIXES.get((family, update.component))
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(self_attn\.([qkv])_proj|.+)", update.path)
    if prefix is None or match is None:
        return None
    block = f"{prefix}transformer.resblocks.{match[1]}."
    if match[3]:
        return f"{block}attn.in_proj_weight", "qkv".index(match[3])
    return (f"{block}{OPEN_CLIP_LAYERS[match[2]]}.weight", None) if match[2] in OPEN_CLIP_LAYERS else None


def merge_into_diffusers(base: Path, source: LoraSource, out: Path, strength: float) -> Path:
    """diffusers' load_lora_weights + fuse_lora on the base pipeline, saved as a folder at `out`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = detect_diffusers_family(base)
    weights = stored_weights(base)
    if "unet" not in weights:
        raise UserError(f"{base}/unet holds no .safetensors weights; merge reads diffusers folders saved with "
                        f"safe_serialization (load and save_pretrained the model once to convert it)")
    check_fits_folder(source, weights, family, read_json(base / "unet" / "config.json")["layers_per_block"])
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    # float32 for the sums; each component is saved back in the dtype it was stored in
    pipe = pipeline_class.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(str(source.weights), adapter_name="merged")
    pipe.fuse_lora(lora_scale=strength, safe_fusing=True)
    pipe.unload_lora_weights()
    for name, component in pipe.components.items():
        dtype = next((dtype for dtype, _ in weights.get(name, {}).values() if dtype is not None), None)
        if isinstance(component, torch.nn.Module) and dtype not in (None, component.dtype):
            component.to(dtype)
    write_atomically(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out


def stored_weights(folder: Path) -> dict[str, dict[str, tuple[torch.dtype | None, tuple[int, ...]]]]:
    """component -> weight key -> (dtype, shape) from the headers of a diffusers folder's weights
    (dtype None for non-float tensors)."""
    found: dict[str, dict[str, tuple[torch.dtype | None, tuple[int, ...]]]] = {}
    for path in sorted(folder.glob("*/*.safetensors")):
        if COMPONENT_WEIGHTS.fullmatch(path.name):
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    found.setdefault(path.parent.name, {})[key] = (
                        SAFETENSORS_DTYPES.get(tensor.get_dtype()), tuple(tensor.get_shape()))
    return found


def check_fits_folder(source: LoraSource, weights: dict, family: str, layers_per_block: int) -> None:
    """UserError naming the first LoRA module with no same-shaped weight in the diffusers folder
    (diffusers' loader would skip some such modules with only a warning)."""
    for update in lora_updates(source, family, layers_per_block):
        found = weights.get(update.component, {})  # text encoder files may keep `text_model.`
        _, shape = found.get(f"{update.path}.weight", found.get(f"text_model.{update.path}.weight", (None, None)))
        if shape is None:
            raise mismatch(source, update.name, family, "no such layer")
        if shape != update.delta_shape():
            raise mismatch(source, update.name, family, f"LoRA shape {list(update.delta_shape())}, weight {list(shape)}")
