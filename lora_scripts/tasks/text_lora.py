"""Text task: the PEFT LoRA a run trains, built from the method keys (DoRA, rsLoRA, PiSSA/OLoRA,
rank/alpha patterns), continued from an earlier adapter, saved, and optionally on a 4-bit base.

PiSSA and OLoRA (PEFT `init_lora_weights`) move the principal part of every adapted weight into
the adapter at init, leaving a residual base. The run keeps that initial adapter in
`output_dir/lora_init/` and saves every adapter with PEFT's own conversion
(`save_pretrained(path_initial_model_for_weight_conversion=...)`): delta = BA - B0A0 written as a
plain LoRA of rank 2r, which loads on the untouched base (and in vLLM, llama.cpp, merging).
A resume rebuilds the same init: the SVD/QR of the same weights, seeded as the first run was.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from lora_scripts.atomic import write_atomically
from lora_scripts.checkpoint import rng_state, set_rng_state
from lora_scripts.config import CONVERTED_INITS, TrainConfig
from lora_scripts.errors import UserError, read_json
from lora_scripts.models.gguf_cache import cached_copy
from lora_scripts.models.llm import load_llm, load_tokenizer
from lora_scripts.models.precision import compute_dtype

BLOCK_CONTAINERS = (".layers.", ".h.", ".blocks.")
INITIAL_ADAPTER_DIR = "lora_init"  # output_dir/lora_init: the PiSSA/OLoRA adapter as initialised
BNB_VERSION = "0.50.2"  # the bitsandbytes release whose CPU and CUDA NF4 paths were measured
CPU_NF4_BLOCK = 64  # bitsandbytes' CPU NF4 kernels pack each row in blocks of 64 inputs


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (not the LM head or embeddings)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part in f".{name}." for part in BLOCK_CONTAINERS)
    }
    if not names:
        raise UserError("could not find linear layers inside transformer blocks; set target_modules explicitly")
    return sorted(names)


def lora_config(cfg: TrainConfig, model: nn.Module) -> LoraConfig:
    """The PEFT LoraConfig of a fresh adapter: rank, alpha, targets and every method key."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or default_target_modules(model),
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=cfg.init_lora_method or True,
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model: nn.Module, cfg: TrainConfig) -> PeftModel:
    """Wrap the base model with a fresh LoRA, or with the one named by `init_lora_weights`:
    a PEFT adapter folder, or a PEFT `adapter_model.safetensors` file (shaped by this config)."""
    source = cfg.init_lora_path
    if source is not None and source.is_dir():
        try:
            return PeftModel.from_pretrained(model, str(source), is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"init_lora_weights {source}: does not fit base_model {cfg.base_model} ({str(exc).splitlines()[0]})") from None
    peft_model = get_peft_model(model, lora_config(cfg, model))
    if source is not None:
        _load_adapter_file(peft_model, cfg, source)
    return peft_model


def check_init_lora(cfg: TrainConfig) -> None:
    """Cheap checks of an `init_lora_weights` path: it exists, is a PEFT adapter, and was trained
    with this config's rank, DoRA, rsLoRA and rank/alpha patterns (a folder brings its own config,
    which must agree; a file takes ours). Raises UserError naming the key to set."""
    source = cfg.init_lora_path
    if source is None:
        return
    if source.is_dir():
        config_file = source / "adapter_config.json"
        if not config_file.is_file():
            raise UserError(f"init_lora_weights {source}: not a PEFT adapter folder (no adapter_config.json)")
        saved = read_json(config_file, "init_lora_weights")
        rank = saved.get("r")
        for key, default in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {})):
            value = saved.get(key) or default
            if value != getattr(cfg, key):
                raise UserError(f"init_lora_weights {source}: was trained with {key}: {json.dumps(value)}; set {key}: {json.dumps(value)}")
    elif source.is_file() and source.suffix == ".safetensors":
        try:
            with safe_open(str(source), "pt") as handle:
                keys = list(handle.keys())
                ranks = {handle.get_slice(k).get_shape()[0] for k in keys if "lora_A" in k}
        except (OSError, SafetensorError) as exc:
            raise UserError(f"init_lora_weights {source}: not a readable safetensors file ({exc})") from None
        if not ranks:
            raise UserError(f"init_lora_weights {source}: holds no PEFT LoRA weights (no `lora_A` keys)")
        dora = any("lora_magnitude_vector" in key for key in keys)
        if dora != cfg.use_dora:
            raise UserError(f"init_lora_weights {source}: {'holds' if dora else 'has no'} DoRA magnitudes; set use_dora: {str(dora).lower()}")
        if cfg.rank_pattern and cfg.lora_rank in ranks:
            rank = cfg.lora_rank  # the other ranks are the pattern's; their shapes are checked as it loads
        else:
            rank = min(ranks) if len(ranks) == 1 else sorted(ranks)
    else:
        raise UserError(f"init_lora_weights {source}: not found; expected a PEFT adapter folder or an adapter .safetensors file")
    if rank != cfg.lora_rank:
        raise UserError(f"init_lora_weights {source}: rank {rank} differs from lora_rank {cfg.lora_rank}; set lora_rank: {rank}")


def _load_adapter_file(peft_model: PeftModel, cfg: TrainConfig, source: Path) -> None:
    try:
        result = set_peft_model_state_dict(peft_model, load_file(str(source)))
    except RuntimeError as exc:
        raise UserError(f"init_lora_weights {source}: does not fit base_model {cfg.base_model} ({str(exc).splitlines()[0]})") from None
    if result.unexpected_keys:
        raise UserError(f"init_lora_weights {source}: {len(result.unexpected_keys)} weights match no module of base_model {cfg.base_model} (e.g. {result.unexpected_keys[0]})")


@contextmanager
def unchanged_rng() -> Iterator[None]:
    """Run a block without moving any random state: PEFT's conversion builds (and drops) a LoRA
    layer set, whose init draws from torch's RNG, and a checkpoint must not change what follows."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class AdapterWriter:
    """Saves the run's adapter: as PEFT wrote it, or, after PiSSA/OLoRA, converted to plain LoRA.

    Built right after the LoRA is attached: for a converted method it first writes the initial
    adapter to `output_dir/lora_init/` (config saying `init_lora_weights: true`, as PEFT's
    conversion requires).
    """

    def __init__(self, peft_model: PeftModel, cfg: TrainConfig) -> None:
        self.peft_model = peft_model
        self.initial: Path | None = None
        if (cfg.init_lora_method or "").startswith(CONVERTED_INITS):
            self.initial = cfg.output_dir / INITIAL_ADAPTER_DIR
            config = peft_model.peft_config["default"]
            method, config.init_lora_weights = config.init_lora_weights, True
            try:
                write_atomically(self.initial, lambda tmp: peft_model.save_pretrained(str(tmp), safe_serialization=True))
            finally:
                config.init_lora_weights = method

    def __call__(self, folder: Path) -> list[Path]:
        """Write adapter_config.json + adapter_model.safetensors into `folder`."""
        conversion = {} if self.initial is None else {"path_initial_model_for_weight_conversion": str(self.initial)}
        training = self.peft_model.training
        with unchanged_rng():
            self.peft_model.save_pretrained(str(folder), safe_serialization=True, **conversion)
        self.peft_model.train(training)  # the conversion's load_adapter leaves the model in eval mode (no dropout)
        return [folder / "adapter_config.json", folder / "adapter_model.safetensors"]


def method_summary(cfg: TrainConfig) -> str:
    """The LoRA variant in words, e.g. `LoRA r=8 alpha=16, DoRA, rsLoRA, LoRA+ x16, init pissa`."""
    parts = [f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g}"]
    parts += [name for name, on in (("DoRA", cfg.use_dora), ("rsLoRA", cfg.use_rslora), ("4-bit NF4 base (QLoRA)", cfg.load_in_4bit)) if on]
    if cfg.loraplus_lr_ratio:
        parts.append(f"LoRA+ x{cfg.loraplus_lr_ratio:g}")
    if cfg.rank_pattern or cfg.alpha_pattern:
        parts.append(f"patterns rank {dict(cfg.rank_pattern)} alpha {dict(cfg.alpha_pattern)}")
    if cfg.init_lora_method:
        converted = " (saved converted to plain LoRA, rank x2)" if cfg.init_lora_method.startswith(CONVERTED_INITS) else ""
        parts.append(f"init {cfg.init_lora_method}{converted}")
    return ", ".join(parts)


def load_base(cfg: TrainConfig, device: str) -> tuple[nn.Module, object]:
    """The frozen base model and its tokenizer: full precision, or 4-bit NF4 with `load_in_4bit`."""
    if not cfg.load_in_4bit:
        return load_llm(cfg.base_model, compute_dtype(cfg.mixed_precision, device))
    return load_base_4bit(cfg.base_model, device)


def load_base_4bit(base_model: str, device: str) -> tuple[nn.Module, object]:
    """QLoRA's base (Dettmers et al. 2023): NF4 weights, double quantization, bf16 compute, as
    transformers' BitsAndBytesConfig loads them. transformers cannot quantize while reading a
    GGUF file, so a GGUF base is quantized from its dequantized copy (gguf_cache.py) or, when
    none is cached, from a bf16 copy saved to a temporary folder.

    Raises UserError when bitsandbytes is missing, or on a CPU when a layer's width is not a
    multiple of 64 (bitsandbytes' CPU kernels work in blocks of 64).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            f"load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: pip install bitsandbytes=={BNB_VERSION} "
            "(4-bit NF4 layers run on a CUDA GPU; this release also runs them on a CPU); or set load_in_4bit: false"
        ) from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    options = {"quantization_config": quantization, "dtype": torch.bfloat16, "device_map": {"": device}, "local_files_only": True}
    path = Path(base_model)
    tokenizer = load_tokenizer(base_model)
    with tempfile.TemporaryDirectory(prefix="lora-scripts-qlora-") as tmp:
        source = path if path.is_dir() else cached_copy(path)
        if source is None:  # an uncached GGUF: dequantize, then save without transformers' GGUF quantizer
            dequantized, _ = load_llm(base_model, torch.bfloat16)
            dequantized.hf_quantizer = None
            dequantized.config.__dict__.pop("quantization_config", None)
            dequantized.save_pretrained(tmp, safe_serialization=True)
            del dequantized
            source = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(str(source), **options)
    model.name_or_path = base_model  # what the adapter records as its base (not a temporary folder)
    if device == "cpu":
        narrow = sorted({m.in_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features % CPU_NF4_BLOCK})
        if narrow:
            raise UserError(f"load_in_4bit on a CPU: bitsandbytes packs 4-bit rows in blocks of {CPU_NF4_BLOCK} inputs, and this model has layers {narrow} wide; train on a CUDA GPU or set load_in_4bit: false")
    # norms and embeddings to float32 for stable training; gradient checkpointing stays the task's own switch
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer
