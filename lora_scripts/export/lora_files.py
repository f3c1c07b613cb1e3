"""Open a LoRA a user hands us, whatever wrote it, and list its adapted modules.

Four layouts are recognised, by their keys (the same tests their loaders apply):
- kohya / A1111: one `.safetensors` whose keys all start with `lora_unet_`, `lora_te_`,
  `lora_te1_` or `lora_te2_` (diffusers' `lora_state_dict` uses exactly this test);
- diffusers image LoRA: `pytorch_lora_weights.safetensors` (or its folder) with keys under
  `unet.`, `text_encoder.` or `text_encoder_2.`;
- PEFT adapter: a folder with `adapter_config.json`, or its `adapter_model.safetensors`
  (keys under `base_model.model.`);
- GGUF LoRA adapter (llama.cpp): a `.gguf` whose `general.type` is `adapter`.

Module kinds follow the tensor names their runtimes look for: `lora_down`/`lora_up`/`alpha`
(kohya), `lora_A`/`lora_B` (PEFT, diffusers), `hada_w1_a`… (LyCORIS LoHa), `lokr_w1`… (LyCORIS
LoKr); `dora_scale` (kohya/LyCORIS) and `lora_magnitude_vector` (PEFT) mark DoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import ARCHITECTURES, BASE_MODEL_VERSIONS

KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# tensor-name suffixes, in the order the module kinds are tried
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DORA_KEYS = ("dora_scale", "lora_magnitude_vector")
FIX_FORMAT = ("expected a kohya/A1111 .safetensors, a diffusers pytorch_lora_weights.safetensors, "
              "a PEFT adapter folder (adapter_config.json) or a GGUF LoRA adapter")


@dataclass
class LoraSource:
    """A LoRA on disk: its layout, the file holding its tensors, and what is written beside them."""

    path: Path
    format: str  # kohya | diffusers | peft | gguf
    weights: Path
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    config: dict = field(default_factory=dict)  # adapter_config.json (PEFT)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor name -> shape (safetensors order)
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> dtype name


@dataclass
class LoraModule:
    """One adapted layer: its name in the file, which part of the model it sits in, and its factors."""

    name: str  # key prefix in the file, e.g. lora_unet_…_to_q or base_model.model.model.layers.0.self_attn.q_proj
    group: str  # unet / te / te1 / te2 for images; the target leaf (q_proj) for text
    kind: str  # lora | loha | lokr
    keys: dict[str, str]  # role (down, up, alpha, dora, hada_w1_a, …) -> tensor name
    rank: int
    alpha: float | None  # None: the format stores none (its scale is then 1, alpha = rank)
    kernel: tuple[int, ...] = ()  # conv kernel of the down factor, e.g. (3, 3); () for Linear

    @property
    def dora(self) -> bool:
        return "dora" in self.keys


def open_lora(path: str | Path) -> LoraSource:
    """Recognise the LoRA at `path` (file or folder) and read its header, never its weights.

    Raises UserError for a missing path, an unreadable file, or a layout none of the four.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; {FIX_FORMAT}")
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _peft_source(path, path / PEFT_WEIGHTS)
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return _safetensors_source(path, path / DIFFUSERS_WEIGHTS)
        raise UserError(f"{path}: folder holds neither {PEFT_CONFIG} nor {DIFFUSERS_WEIGHTS}; {FIX_FORMAT}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return _gguf_source(path)
    if path.suffix.lower() == ".gguf":
        raise UserError(f"{path} is not a readable GGUF file (no GGUF magic); it may be truncated or corrupt")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: unknown LoRA file type {path.suffix or '(no suffix)'!r}; {FIX_FORMAT}")
    if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        return _peft_source(path.parent, path)
    return _safetensors_source(path, path)


def _read_header(path: Path, source: LoraSource) -> None:
    """Fill metadata, shapes and dtypes from a .safetensors header."""
    try:
        with safe_open(path, framework="pt") as handle:
            source.metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                source.shapes[key] = list(tensor_slice.get_shape())
                source.dtypes[key] = tensor_slice.get_dtype()
    except SafetensorError as err:
        raise UserError(f"{path} is not a readable .safetensors file ({err}); it may be truncated or corrupt") from None


def _safetensors_source(path: Path, weights: Path) -> LoraSource:
    source = LoraSource(path, "", weights)
    _read_header(weights, source)
    keys = list(source.shapes)
    if not keys:
        raise UserError(f"{weights} holds no tensors; {FIX_FORMAT}")
    if all(_kohya_prefix(key) for key in keys):
        source.format = "kohya"
    elif all(key.split(".", 1)[0] in DIFFUSERS_PREFIXES for key in keys):
        source.format = "diffusers"
    elif all(key.startswith(PEFT_PREFIX) for key in keys):
        source.format = "peft"  # a bare adapter_model.safetensors without its config
    else:
        raise UserError(f"{weights}: unknown LoRA layout (first key {keys[0]!r}); {FIX_FORMAT}")
    return source


def _peft_source(folder: Path, weights: Path) -> LoraSource:
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise UserError(f"{folder}: PEFT adapter without {PEFT_WEIGHTS} (found {found}); save it with safe_serialization=True")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{folder / PEFT_CONFIG}: not valid JSON; the adapter folder is damaged") from None
    source = LoraSource(folder, "peft", weights, config=config)
    _read_header(weights, source)
    return source


def _gguf_source(path: Path) -> LoraSource:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise UserError(f"{path} is not a readable GGUF file ({err}); it may be truncated or corrupt") from None
    metadata = {name: str(value.contents()) for name, value in reader.fields.items() if not name.startswith("GGUF.")}
    if metadata.get(gguf.Keys.General.TYPE) != "adapter":
        raise UserError(f"{path} is a GGUF model, not a LoRA adapter (general.type is "
                        f"{metadata.get(gguf.Keys.General.TYPE, 'unset')!r}); {FIX_FORMAT}")
    source = LoraSource(path, "gguf", path, metadata=metadata)
    for tensor in reader.tensors:
        # GGUF lists ne (fastest dimension first); safetensors/torch order is the reverse
        source.shapes[tensor.name] = [int(n) for n in reversed(tensor.shape.tolist())]
        source.dtypes[tensor.name] = tensor.tensor_type.name
    return source


def _kohya_prefix(key: str) -> str | None:
    """`lora_unet` / `lora_te` / `lora_te1` / `lora_te2` for a kohya key, else None."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if key.startswith(prefix + "_"):
            return prefix
    return None


def lora_modules(source: LoraSource) -> list[LoraModule]:
    """Every adapted module of a kohya, diffusers or PEFT source (GGUF: see `gguf_modules`)."""
    if source.format == "gguf":
        return gguf_modules(source)
    by_module: dict[str, dict[str, str]] = {}
    for key in source.shapes:
        module, role = _split_key(key)
        if role:
            by_module.setdefault(module, {})[role] = key
    alphas = _load(source, [key for key in source.shapes if key.endswith(".alpha")]) if source.format == "kohya" else {}
    two_encoders = any(key.startswith("text_encoder_2.") for key in source.shapes)  # diffusers SDXL
    modules = [_module(source, name, keys, alphas, two_encoders) for name, keys in sorted(by_module.items())]
    return [module for module in modules if module is not None]


def _split_key(key: str) -> tuple[str, str | None]:
    """(module name, role) of a tensor key; role None for tensors that are not adapter factors."""
    roles = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
             "lora.down.weight": "down", "lora.up.weight": "up", "alpha": "alpha",
             **{name: "dora" for name in DORA_KEYS}, "lora_magnitude_vector.weight": "dora",
             **{name: name for name in LOHA_KEYS + LOKR_KEYS}}
    for suffix, role in roles.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return key, None


def _module(source: LoraSource, name: str, keys: dict[str, str], alphas: dict[str, torch.Tensor],
            two_encoders: bool) -> LoraModule | None:
    shapes = source.shapes
    if "down" in keys and "up" in keys:
        kind, down = "lora", shapes[keys["down"]]
        rank, kernel = down[0], tuple(down[2:])
    elif "hada_w1_a" in keys:
        kind, rank, kernel = "loha", shapes[keys["hada_w1_b"]][0], tuple(shapes.get(keys.get("hada_t1", ""), [])[2:])
    elif any(role.startswith("lokr_") for role in keys):
        factor = keys.get("lokr_w2_b") or keys.get("lokr_w1_b")
        kind, rank = "lokr", shapes[factor][0] if factor else 0  # full-matrix LoKr factors have no rank
        kernel = tuple(shapes[keys["lokr_w2"]][2:]) if "lokr_w2" in keys else ()
    else:
        return None
    return LoraModule(name, _group(source, name, two_encoders), kind, keys, rank, _alpha(source, name, keys, alphas), kernel)


def _group(source: LoraSource, name: str, two_encoders: bool) -> str:
    if source.format == "kohya":
        return KOHYA_PREFIXES[_kohya_prefix(name)]
    if source.format == "diffusers":
        prefix = name.split(".", 1)[0]
        return {"unet": "unet", "text_encoder": "te1" if two_encoders else "te", "text_encoder_2": "te2"}[prefix]
    return name.rsplit(".", 1)[-1]


def _alpha(source: LoraSource, name: str, keys: dict[str, str], alphas: dict[str, torch.Tensor]) -> float | None:
    """The alpha that scales this module (scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA)."""
    if source.format == "kohya":
        return float(alphas[keys["alpha"]]) if "alpha" in keys else None
    if source.format == "peft":
        return peft_alpha(source.config, name.removeprefix(PEFT_PREFIX)) if source.config else None
    config = diffusers_adapter_config(source, name.split(".", 1)[0])
    return peft_alpha(config, name.split(".", 1)[1]) if config else None


def peft_alpha(config: dict, module_path: str) -> float:
    """A PEFT module's lora_alpha: its `alpha_pattern` entry (PEFT's own matching) or `lora_alpha`."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    return float(pattern.get(get_pattern_key(pattern.keys(), module_path), config.get("lora_alpha", 8)))


def diffusers_adapter_config(source: LoraSource, component: str) -> dict:
    """The LoraConfig diffusers saved for one component (`lora_adapter_metadata`), or {}."""
    packed = json.loads(source.metadata.get("lora_adapter_metadata", "{}"))
    prefix = component + "."
    return {key.removeprefix(prefix): value for key, value in packed.items() if key.startswith(prefix)}


def module_scale(source: LoraSource, module: LoraModule) -> float:
    """The factor the runtime multiplies up @ down by: alpha / rank (rsLoRA: alpha / sqrt(rank))."""
    if module.alpha is None:
        return 1.0
    rslora = (source.config.get("use_rslora") if source.format == "peft"
              else diffusers_adapter_config(source, module.name.split(".", 1)[0]).get("use_rslora")
              if source.format == "diffusers" else False)
    return module.alpha / (math.sqrt(module.rank) if rslora else module.rank)


def load_tensors(source: LoraSource, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors source (all, or `keys`); a damaged data section is a UserError."""
    return _load(source, keys if keys is not None else list(source.shapes))


def _load(source: LoraSource, keys: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(source.weights, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except SafetensorError as err:
        raise UserError(f"{source.weights}: tensor data unreadable ({err}); the file is truncated or corrupt") from None


def gguf_modules(source: LoraSource) -> list[LoraModule]:
    """The lora_a/lora_b pairs of a GGUF adapter; the group is the tensor kind (attn_q, ffn_up…)."""
    alpha = float(source.metadata.get("adapter.lora.alpha", "0")) or None
    modules = []
    for key in sorted(source.shapes):
        if key.endswith(".lora_a") and key[:-1] + "b" in source.shapes:
            name = key.removesuffix(".lora_a")
            group = re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")
            rank = source.shapes[key[:-1] + "b"][1]  # llama.cpp reads the rank from lora_b (ne[0])
            modules.append(LoraModule(name, group, "lora", {"down": key, "up": key[:-1] + "b"}, rank, alpha))
    return modules


def image_family(source: LoraSource, modules: list[LoraModule]) -> tuple[str | None, str]:
    """(sd1 | sd2 | sd2_v | sdxl | None, how it was told) for a kohya or diffusers image LoRA.

    In order: kohya's `ss_base_model_version`, `modelspec.architecture`, SDXL-only names
    (two text encoders, SGM `input_blocks_…` UNet names), then the cross-attention width of the
    UNet's attn2 to_k (768 SD1, 1024 SD2, 2048 SDXL) or the text encoder's width (768 / 1024).
    """
    version = source.metadata.get("ss_base_model_version", "")
    for family, value in BASE_MODEL_VERSIONS.items():
        if version == value:
            return family, "ss_base_model_version"
    if version.startswith("sdxl"):
        return "sdxl", "ss_base_model_version"
    architecture = source.metadata.get("modelspec.architecture", "").removesuffix("/lora")
    for family, value in ARCHITECTURES.items():
        if architecture == value:
            return family, "modelspec.architecture"
    groups = {module.group for module in modules}
    if "te2" in groups or any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", m.name) for m in modules):
        return "sdxl", "module names"
    for module in modules:
        width = source.shapes[module.keys["down"]][1] if module.kind == "lora" else 0
        if re.search(r"attn2[._]to_k$", module.name) and width in (768, 1024, 2048):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}[width], "cross-attention width"
        if module.group in ("te", "te1") and re.search(r"q_proj$", module.name) and width in (768, 1024):
            return {768: "sd1", 1024: "sd2"}[width], "text encoder width"
    return None, "unknown"
