"""What a LoRA file is and where it runs: the facts behind `lora-scripts inspect`.

`describe(path)` returns a plain dict (the `--json` output; its keys are documented in
`lora_scripts/export/inspect_cmd.py`). The runtime verdicts come from each loader's own rules:
- A1111 (`extensions-builtin/Lora/networks.py`) and ComfyUI (`comfy/lora.py`) read kohya names
  with LoRA, LoCon, LoHa, LoKr and `dora_scale`; ComfyUI maps diffusers UNet attention keys only
  in the old `…attn1.processor.to_q` form.
- diffusers (`loaders/lora_pipeline.py`, `lora_conversion_utils.py`): a kohya SD file may hold
  only lora_down / lora_up / alpha (anything else raises), and `dora_scale` is dropped with a
  warning, so a kohya DoRA loads as a plain LoRA.
- vLLM (`vllm/lora/peft_helper.py`, `vllm/config/lora.py`): refuses `modules_to_save`, DoRA and
  `bias` other than "none"; scales every module by one lora_alpha / r (rsLoRA: / sqrt(r)), so
  modules that rank_pattern / alpha_pattern give another scale would load wrong; an adapter loads
  when its largest rank is at most `--max-lora-rank`,
  which takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16).
- llama.cpp (`src/llama-adapter.cpp`) loads GGUF adapters only (`lora-scripts export --to gguf`),
  with no DoRA magnitudes and no full embedding / lm_head tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from collections import Counter
from pathlib import Path

import yaml

from lora_scripts.export.kohya import addnet_hash
from lora_scripts.export.lora_files import (
    PEFT_PREFIX,
    LoraModule,
    LoraSource,
    diffusers_adapter_config,
    image_family,
    lora_modules,
    module_scale,
    open_lora,
)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
IMAGE_RUNTIMES = ("a1111", "comfyui", "diffusers")
TEXT_RUNTIMES = ("peft", "vllm", "llama.cpp")
IMAGE_GROUPS = ("unet", "te", "te1", "te2")  # shown in this order; text groups alphabetically
# kohya ss_* keys shown under "training", as (output name, metadata key)
KOHYA_TRAINING_KEYS = (
    ("steps", "ss_steps"), ("epoch", "ss_epoch"), ("epochs", "ss_num_epochs"), ("learning_rate", "ss_learning_rate"),
    ("unet_lr", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr"), ("resolution", "ss_resolution"),
    ("batch_size", "ss_batch_size_per_device"), ("train_images", "ss_num_train_images"), ("optimizer", "ss_optimizer"),
    ("lr_scheduler", "ss_lr_scheduler"), ("seed", "ss_seed"), ("mixed_precision", "ss_mixed_precision"),
    ("network_module", "ss_network_module"), ("network_dim", "ss_network_dim"), ("network_alpha", "ss_network_alpha"),
    ("network_args", "ss_network_args"), ("base_model", "ss_sd_model_name"), ("output_name", "ss_output_name"),
    ("comment", "ss_training_comment"),
)
# lora-scripts' training_config.yaml keys shown under "training" for a PEFT adapter
CONFIG_TRAINING_KEYS = ("base_model", "lora_rank", "lora_alpha", "learning_rate", "epochs", "max_steps", "batch_size",
                        "gradient_accumulation_steps", "max_seq_length", "seed", "train_data_dir", "init_lora_weights",
                        "use_dora", "use_rslora", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern", "load_in_4bit")
# the block indices kohya/diffusers module paths run through; what follows the last one is the layer's own name
_BLOCK_INDEX = re.compile(r"(?:transformer_blocks|layers|resnets|attentions|downsamplers|upsamplers)[._]\d+[._]"
                          r"|(?:input_blocks|output_blocks)[._]\d+[._]\d+[._]|middle_block[._]\d+[._]")
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def describe(path: str | Path) -> dict:
    """Everything `inspect` reports about the LoRA at `path`. Raises UserError for unreadable input."""
    source = open_lora(path)
    modules = lora_modules(source)
    is_image = source.format in ("kohya", "diffusers")
    family, family_source, base_model = base_of(source, modules)
    factor_keys = [key for key in source.shapes if not key.endswith(".alpha")]
    info = {
        "path": str(source.path),
        "format": source.format,
        "weights_file": str(source.weights),
        "kind": "image" if is_image else "text",
        "family": family,
        "family_source": family_source,
        "base_model": base_model,
        "method": method(source, modules),
        "module_count": len(modules),
        "groups": _groups(modules),
        "targets": dict(sorted(Counter(_target(source, m) for m in modules).items())),
        "dtypes": sorted({_TORCH_DTYPES.get(source.dtypes[key], source.dtypes[key].lower()) for key in factor_keys}),
        "size_bytes": source.weights.stat().st_size,
        "parameters": sum(math.prod(source.shapes[key]) for key in factor_keys),
        "training": _training(source),
        "hashes": _hashes(source),
    }
    verdicts = image_verdicts(source, modules) if is_image else text_verdicts(source, modules)
    info["runs_in"] = {name: {"ok": ok, "why": why} for name, (ok, why) in verdicts.items()}
    return info


def method(source: LoraSource, modules: list[LoraModule]) -> str:
    """lora, locon, loha or lokr, followed by "+dora" and "+rslora" where they apply ("lora" is
    dropped when something follows it: "dora", "dora+rslora", "locon+dora")."""
    kinds = {module.kind for module in modules}
    base = "lokr" if "lokr" in kinds else "loha" if "loha" in kinds else "lora"
    if base == "lora" and any(module.kernel[-2:] == (3, 3) for module in modules):
        base = "locon"
    config = source.config if source.format == "peft" else {}
    if source.format == "peft" and config.get("peft_type", "LORA") != "LORA":
        base = config["peft_type"].lower()
    extras = []
    if any(module.dora for module in modules) or config.get("use_dora"):
        extras.append("dora")
    rslora = config.get("use_rslora") or (source.format == "diffusers" and any(
        diffusers_adapter_config(source, part).get("use_rslora") for part in ("unet", "text_encoder", "text_encoder_2")))
    if rslora:
        extras.append("rslora")
    parts = ([] if base == "lora" and extras else [base]) + extras
    return "+".join(parts)


def base_of(source: LoraSource, modules: list[LoraModule]) -> tuple[str | None, str, str | None]:
    """(family, how it was told, base model name) for any format."""
    if source.format in ("kohya", "diffusers"):
        family, told = image_family(source, modules)
        return family, told, source.metadata.get("ss_sd_model_name")
    if source.format == "gguf":
        return source.metadata.get("general.architecture"), "general.architecture", source.metadata.get("general.base_model.0.name")
    base = source.config.get("base_model_name_or_path")
    config_file = Path(base) / "config.json" if base else None
    if config_file is not None and config_file.is_file():
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        return model_type, "base model config.json", base
    return None, "base model not on this machine" if base else "unknown", base


def _groups(modules: list[LoraModule]) -> list[dict]:
    """Per group (unet / te / te1 / te2, or text target): module count, distinct ranks and alphas."""
    groups: dict[str, list[LoraModule]] = {}
    for module in sorted(modules, key=lambda m: (IMAGE_GROUPS.index(m.group) if m.group in IMAGE_GROUPS else len(IMAGE_GROUPS), m.group)):
        groups.setdefault(module.group, []).append(module)
    return [{
        "name": name,
        "modules": len(members),
        "ranks": sorted({m.rank for m in members}),
        "alphas": sorted({m.alpha for m in members if m.alpha is not None}),
        "conv3x3_modules": sum(m.kernel[-2:] == (3, 3) for m in members),
    } for name, members in groups.items()]


def _target(source: LoraSource, module: LoraModule) -> str:
    """The layer's own name (to_q, attn1_to_q, ff_net_0_proj, q_proj, attn_q…) without its block path."""
    if source.format in ("peft", "gguf"):
        return module.group
    name = module.name.split(".", 1)[1] if source.format == "diffusers" else module.name
    return _BLOCK_INDEX.split(name)[-1]


def _training(source: LoraSource) -> dict:
    """Training facts: kohya's ss_* metadata, or lora-scripts' training_config.yaml beside a PEFT adapter."""
    if source.format == "kohya" or (source.format == "diffusers" and source.metadata.get("ss_steps")):
        facts = {name: _value(source.metadata[key]) for name, key in KOHYA_TRAINING_KEYS if key in source.metadata}
        started, finished = (_value(source.metadata.get(k, "None")) for k in ("ss_training_started_at", "ss_training_finished_at"))
        if isinstance(started, float | int) and isinstance(finished, float | int):
            facts["training_seconds"] = round(finished - started, 1)
        return {key: value for key, value in facts.items() if value is not None}
    config_file = source.weights.parent / "training_config.yaml"
    if source.format == "peft" and config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        # method switches only when on (use_dora: false, rank_pattern: {} say nothing)
        return {key: config[key] for key in CONFIG_TRAINING_KEYS if config.get(key) is not None and config[key] is not False and config[key] != {}}
    return {}


def _value(text: str):
    """A kohya metadata string as the value it was written from (they are all str(value))."""
    if text == "None":
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text.startswith("(") and text.endswith(")"):  # ss_resolution: "(512, 512)"
        return "x".join(part.strip() for part in text[1:-1].split(","))
    return text


def _hashes(source: LoraSource) -> dict:
    """sha256 of the file (civitai's AutoV2 is its first 10 digits), A1111's addnet hash and the
    hashes kohya stored, with whether the stored addnet hash still matches."""
    with source.weights.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        hashes = {"sha256": hashlib.sha256(data).hexdigest(),
                  "addnet": None if source.format == "gguf" else addnet_hash(data)}
    stored = source.metadata.get("sshs_model_hash")
    hashes["sshs_model_hash"] = stored
    hashes["sshs_legacy_hash"] = source.metadata.get("sshs_legacy_hash")
    hashes["sshs_model_hash_matches"] = None if stored is None else stored == hashes["addnet"]
    return hashes


def image_verdicts(source: LoraSource, modules: list[LoraModule]) -> dict[str, tuple[bool, str]]:
    """(loads?, why) for A1111, ComfyUI and diffusers."""
    kinds = {module.kind for module in modules}
    dora = any(module.dora for module in modules)
    if source.format == "kohya":
        a1111 = comfy = (True, "kohya names; LoRA, LoCon, LoHa, LoKr and dora_scale are all read")
        if kinds & {"loha", "lokr"}:
            diffusers = (False, "diffusers' SD loader converts only lora_down/lora_up/alpha and raises on "
                                f"{'/'.join(sorted(kinds - {'lora'}))} keys (lora_conversion_utils)")
        elif dora:
            diffusers = (False, "diffusers drops dora_scale for SD pipelines: it would load as a plain LoRA with other outputs")
        else:
            diffusers = (True, "pipe.load_lora_weights(file)")
        return {"a1111": a1111, "comfyui": comfy, "diffusers": diffusers}
    attention = [m for m in modules if m.group == "unet" and re.search(r"\.to_(q|k|v|out)", m.name)]
    comfy = ((False, f"ComfyUI maps diffusers UNet attention keys only as `processor.to_q`…, so {len(attention)} "
                     "attention module(s) would be skipped; lora-scripts convert --to kohya") if attention
             else (True, "ComfyUI maps diffusers `unet.`/`text_encoder.` keys"))
    return {
        "a1111": (False, "A1111's Lora extension matches kohya names (lora_unet_…); lora-scripts convert --to kohya"),
        "comfyui": comfy,
        "diffusers": (True, "pipe.load_lora_weights(folder)"),
    }


def text_verdicts(source: LoraSource, modules: list[LoraModule]) -> dict[str, tuple[bool, str]]:
    """(loads?, why) for PEFT, vLLM and llama.cpp."""
    if source.format == "gguf":
        return {
            "peft": (False, "a GGUF adapter; PEFT loads the PEFT folder it was exported from"),
            "vllm": (False, "vLLM serves PEFT adapter folders, not GGUF adapters"),
            "llama.cpp": (True, f"llama-cli -m BASE.gguf --lora {source.path.name} (or --lora-scaled {source.path.name}:0.8)"),
        }
    config = source.config
    if not config:
        missing = f"no adapter_config.json beside {source.weights.name}; PEFT, vLLM and llama.cpp's converter need it"
        return {name: (False, missing) for name in TEXT_RUNTIMES}
    dora = bool(config.get("use_dora")) or any(module.dora for module in modules)
    to_save = [name for name in config.get("modules_to_save") or []]
    saved_tensors = [key for key in source.shapes if key.startswith(PEFT_PREFIX) and _is_full_weight(key)]
    vllm_problems = []
    if config.get("peft_type", "LORA") != "LORA":
        vllm_problems.append(f"peft_type {config['peft_type']} (vLLM serves LoRA only)")
    if to_save or saved_tensors:
        vllm_problems.append(f"modules_to_save {to_save or 'tensors'} (vLLM only supports modules_to_save being None)")
    if dora:
        vllm_problems.append("DoRA (vLLM does not support use_dora)")
    if config.get("bias", "none") != "none":
        vllm_problems.append(f"bias {config['bias']!r} (vLLM: adapter bias is not supported)")
    rank = int(config.get("r", 8))
    one_scale = float(config.get("lora_alpha", 8)) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    rescaled = [m for m in modules if not math.isclose(module_scale(source, m), one_scale, rel_tol=1e-6)]
    if rescaled:
        vllm_problems.append(f"{len(rescaled)} module(s) with their own rank/alpha scale (rank_pattern/alpha_pattern, e.g. "
                             f"{rescaled[0].name.removeprefix(PEFT_PREFIX)}); vLLM applies lora_alpha / r to every module")
    max_rank = max((module.rank for module in modules), default=int(config.get("r", 0)))
    fitting = [rank for rank in VLLM_MAX_LORA_RANKS if rank >= max_rank]
    if not fitting:
        vllm_problems.append(f"rank {max_rank} above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    if vllm_problems:
        vllm = (False, "; ".join(vllm_problems))
    else:
        flag = f"--max-lora-rank {fitting[0]}"
        note = "" if fitting[0] <= VLLM_DEFAULT_MAX_LORA_RANK else f" (the default {VLLM_DEFAULT_MAX_LORA_RANK} refuses rank {max_rank})"
        vllm = (True, f"vllm serve BASE --enable-lora {flag} --lora-modules NAME={source.path}{note}")
    blockers = (["DoRA magnitudes"] if dora else []) + ([f"modules_to_save {to_save}"] if to_save or saved_tensors else [])
    if blockers:
        llama = (False, f"llama.cpp cannot load {' and '.join(blockers)}; `lora-scripts export --to gguf` refuses them")
    else:
        llama = (False, "needs a GGUF adapter: lora-scripts export --to gguf, then llama-cli -m BASE.gguf --lora ADAPTER.gguf")
    return {"peft": (True, "PeftModel.from_pretrained(base, folder)"), "vllm": vllm, "llama.cpp": llama}


def _is_full_weight(key: str) -> bool:
    """A saved full layer (modules_to_save, trained embeddings) rather than an adapter factor."""
    return not re.search(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.weight)?$", key) and not key.endswith(".bias")
