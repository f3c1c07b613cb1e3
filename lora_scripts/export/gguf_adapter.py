"""A PEFT text LoRA as a llama.cpp GGUF LoRA adapter (`llama-cli -m base.gguf --lora adapter.gguf`).

The layout is llama.cpp's own (`convert_lora_to_gguf.py` writes it, `src/llama-adapter.cpp`
reads it): KV `general.type = "adapter"`, `general.architecture` = the base's, `adapter.type =
"lora"`, `adapter.lora.alpha` (float32); per adapted base tensor `<name>.lora_a` (PEFT lora_A
[r, in], ggml ne = [in, r]) and `<name>.lora_b` (PEFT lora_B [out, r], ne = [r, out]), named
after the base GGUF's tensors. llama.cpp scales each pair by user_scale * alpha / rank, the rank
read from each lora_b, so one alpha must reproduce every module's trained scale; where it cannot
(rsLoRA, rank_pattern, alpha_pattern), the written alpha is chosen for most modules and the rest
have the ratio folded into their lora_b.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError, read_json

# --outtype -> (tensor type, general.file_type), as convert_lora_to_gguf.py's ftype_map
OUTTYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# GGUF architectures whose q/k rows convert_hf_to_gguf.py permutes for llama.cpp's interleaved
# RoPE (conversion/llama.py LlamaModel.undo_permute = True and its subclasses, deci.py).
ROPE_PERMUTED_ARCHS = frozenset({"llama", "deci", "granite", "granitemoe", "smollm3", "arcee"})
# Architectures llama.cpp runs with NEOX RoPE, the HF layout: their q/k rows are written as is
# (transformers' GGUF loader, too, un-permutes only `llama`).
ROPE_UNPERMUTED_ARCHS = frozenset({
    "qwen2", "qwen2moe", "qwen3", "qwen3moe", "phi3", "gemma", "gemma2", "gemma3", "gemma4",
    "stablelm", "starcoder2", "falcon", "gpt2", "bloom", "nemotron", "lfm2", "gpt-oss", "minimax-m2",
})
CONVERT_HINT = (
    "llama.cpp needs the base as a .gguf file; make one from a Hugging Face folder with llama.cpp's "
    "`python convert_hf_to_gguf.py MODEL_FOLDER --outfile base.gguf --outtype f16`"
)
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    """One PEFT LoRA pair: `path` is the module path in the HF model (`model.layers.0.self_attn.q_proj`)."""

    path: str
    a: np.ndarray  # [r, in], float32
    b: np.ndarray  # [out, r], float32
    scale: float  # PEFT's trained scaling: alpha / r, or alpha / sqrt(r) with rsLoRA


@dataclass
class GGUFDelta:
    """A LoRA pair placed on a base GGUF tensor: delta = scale * b @ a, b already RoPE-permuted."""

    tensor: str  # base tensor name, e.g. `blk.0.attn_q.weight`
    a: np.ndarray
    b: np.ndarray
    scale: float


@dataclass
class BaseGGUF:
    """A base model GGUF, memory-mapped: its reader, architecture and tensors by name."""

    path: Path
    reader: gguf.GGUFReader
    arch: str
    tensors: dict[str, gguf.ReaderTensor]

    def value(self, key: str, block: int | None = None):
        """A KV value (`{arch}` filled in); per-layer arrays are indexed by `block`."""
        field = self.reader.fields.get(key.format(arch=self.arch))
        if field is None:
            raise UserError(f"base {self.path}: missing `{key.format(arch=self.arch)}`; the GGUF file is incomplete")
        value = field.contents()
        return value[block] if isinstance(value, list) and block is not None else value


def refuse_existing(out: Path) -> None:
    """Outputs are never overwritten."""
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or delete it first")


def read_base_gguf(path: Path) -> BaseGGUF:
    """Open a base model GGUF; anything else (an HF folder, a damaged file, an adapter) is a UserError."""
    if not path.exists():
        raise UserError(f"base {path}: not found")
    if path.is_dir():
        raise UserError(f"base {path}: a folder, not a .gguf file; {CONVERT_HINT}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UserError(f"base {path}: not a GGUF file (starts with {magic!r}); {CONVERT_HINT}")
    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        file_type = reader.fields.get("general.type")
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise UserError(f"base {path}: the GGUF file is truncated or damaged ({exc})") from None
    if file_type is not None and file_type.contents() == "adapter":
        raise UserError(f"base {path}: a GGUF LoRA adapter, not a model; pass the base model's .gguf")
    return BaseGGUF(path, reader, arch, {t.name: t for t in reader.tensors})


def read_peft_adapter(adapter_dir: Path) -> list[LoraModule]:
    """The LoRA pairs of a PEFT adapter folder with their trained scales.

    Raises UserError for what llama.cpp cannot apply: DoRA, `modules_to_save`, trainable
    tokens, trained biases, or any tensor other than lora_A/lora_B weights.
    """
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise UserError(f"adapter {adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    config = read_json(config_file, "adapter")
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise UserError(f"adapter {adapter_dir}: peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) can be exported")
    _refuse_unsupported(adapter_dir, config)
    if not weights_file.is_file():
        raise UserError(f"adapter {adapter_dir}: no adapter_model.safetensors (a .bin adapter must be re-saved with safe_serialization=True)")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"adapter {weights_file}: not a readable safetensors file ({exc}); it is truncated or damaged") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise UserError(f"adapter {adapter_dir}: tensor `{key}` is not a LoRA A/B weight; llama.cpp adapters hold only lora_a/lora_b")
        pairs.setdefault(module, {})[kind[0]] = tensor
    return [_lora_module(adapter_dir, config, path, pair) for path, pair in sorted(pairs.items())]


def _refuse_unsupported(adapter_dir: Path, config: dict) -> None:
    if config.get("use_dora"):
        raise UserError(f"adapter {adapter_dir}: a DoRA adapter (use_dora: true); llama.cpp applies only plain LoRA, so merge it instead (lora-scripts merge --to hf)")
    if config.get("modules_to_save"):
        raise UserError(f"adapter {adapter_dir}: trains whole modules {config['modules_to_save']} (modules_to_save), which a llama.cpp adapter cannot hold; merge it instead (lora-scripts merge --to hf)")
    if config.get("trainable_token_indices"):
        raise UserError(f"adapter {adapter_dir}: trains token embeddings (trainable_token_indices), which a llama.cpp adapter cannot hold; merge it instead (lora-scripts merge --to hf)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UserError(f"adapter {adapter_dir}: trains biases (bias: {config.get('bias')!r}, lora_bias: {config.get('lora_bias')!r}), which a llama.cpp adapter cannot hold")


def _lora_module(adapter_dir: Path, config: dict, path: str, pair: dict[str, torch.Tensor]) -> LoraModule:
    from peft.utils.other import get_pattern_key

    if set(pair) != {"A", "B"}:
        raise UserError(f"adapter {adapter_dir}: module `{path}` lacks its lora_{'B' if 'A' in pair else 'A'} weight; the adapter is damaged")
    a, b = pair["A"].float().numpy(), pair["B"].float().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise UserError(f"adapter {adapter_dir}: module `{path}` has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not a linear LoRA pair")
    rank = a.shape[0]
    # PEFT resolves per-module alphas exactly so (tuners/lora/model.py _create_and_replace)
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), path), config.get("lora_alpha", 8)))  # 8: LoraConfig's default
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraModule(path, a, b, scale)


def plan_deltas(modules: list[LoraModule], base: BaseGGUF, adapter_dir: Path) -> list[GGUFDelta]:
    """Place each LoRA pair on its base GGUF tensor, checking names and shapes, and apply the
    q/k RoPE permutation to lora_b where convert_hf_to_gguf.py permuted the base."""
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == base.arch), None)
    if arch_id is None:
        raise UserError(f"base {base.path}: architecture `{base.arch}` is unknown to the installed gguf package")
    name_map = gguf.get_tensor_name_map(arch_id, int(base.value("{arch}.block_count")))
    deltas = []
    for module in modules:
        found = name_map.get_type_and_name(module.path)
        if found is None or f"{found[1]}.weight" not in base.tensors:
            raise UserError(
                f"adapter {adapter_dir}: module `{module.path}` has no tensor in base {base.path.name} "
                f"(architecture {base.arch}); the adapter was trained for another model"
            )
        kind, name = found
        if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
            raise UserError(f"adapter {adapter_dir}: a LoRA on `{module.path}` (embeddings / lm_head), which this exporter does not write; merge it instead (lora-scripts merge --to hf)")
        tensor = base.tensors[f"{name}.weight"]
        base_shape = tuple(int(n) for n in tensor.shape)  # ggml order: ne[0] = in, ne[1] = out
        if base_shape != (module.a.shape[1], module.b.shape[0]):
            raise UserError(
                f"adapter {adapter_dir}: `{module.path}` maps {module.a.shape[1]} -> {module.b.shape[0]} features but base "
                f"tensor {tensor.name} has ne {list(base_shape)}; the adapter was trained for another model"
            )
        b = module.b
        if kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            b = _permute_like_base(b, kind, base, int(name.split(".")[1]), adapter_dir)
        deltas.append(GGUFDelta(tensor.name, module.a, b, module.scale))
    return deltas


def _permute_like_base(b: np.ndarray, kind: gguf.MODEL_TENSOR, base: BaseGGUF, block: int, adapter_dir: Path) -> np.ndarray:
    if base.arch in ROPE_UNPERMUTED_ARCHS:
        return b
    if base.arch not in ROPE_PERMUTED_ARCHS:
        raise UserError(
            f"adapter {adapter_dir}: adapts q/k projections of a `{base.arch}` model, and whether llama.cpp's "
            "converter permutes their rows for this architecture is not known here; train without "
            "q_proj/k_proj in target_modules, or merge instead (lora-scripts merge --to hf)"
        )
    # convert_hf_to_gguf.py LlamaModel.permute: q with the head count, k with the KV head count
    n_head = int(base.value("{arch}.attention.head_count", block))
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        n_head = int(base.value("{arch}.attention.head_count_kv", block))
    n_out, rank = b.shape
    return b.reshape(n_head, 2, n_out // n_head // 2, rank).swapaxes(1, 2).reshape(n_out, rank)


def stored_type(n_cols: int, qtype: QType) -> QType:
    """The type a row of `n_cols` values is written as: `qtype`, or F16 where rows are not whole
    quant blocks (convert_hf_to_gguf.py's prepare_tensors falls back the same way)."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if n_cols % block_size == 0 else QType.F16


def choose_alpha(deltas: list[GGUFDelta]) -> float:
    """The alpha that gives most modules their trained scale as llama.cpp computes it (alpha / rank)."""
    products = Counter(float(np.float32(d.scale * d.b.shape[1])) for d in deltas)
    return products.most_common(1)[0][0]


def export_gguf_adapter(adapter_dir: Path, base_gguf: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Write the PEFT LoRA in `adapter_dir` as a llama.cpp GGUF adapter for `base_gguf`.

    Raises UserError for an output that exists, a base that is not a GGUF model, and adapters
    llama.cpp cannot load (see `read_peft_adapter`, `plan_deltas`). Returns `out_path`.
    """
    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    refuse_existing(out_path)
    base = read_base_gguf(base_gguf)
    deltas = plan_deltas(read_peft_adapter(adapter_dir), base, adapter_dir)
    if not deltas:
        raise UserError(f"adapter {adapter_dir}: holds no LoRA weights")
    alpha = choose_alpha(deltas)
    if alpha <= 0:
        raise UserError(f"adapter {adapter_dir}: lora_alpha is {alpha:g}; llama.cpp reads alpha <= 0 as 'no scaling', so retrain with a positive lora_alpha")
    qtype, file_type = OUTTYPES[outtype]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp / out_path.name, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.resolve().name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for delta in deltas:
            # fold what one alpha cannot express: llama.cpp applies alpha / rank, PEFT applied scale
            fold = delta.scale * delta.b.shape[1] / alpha
            b = delta.b if math.isclose(fold, 1.0, rel_tol=1e-6) else delta.b * np.float32(fold)
            for suffix, data in ((".lora_a", delta.a), (".lora_b", b)):
                raw_type = stored_type(data.shape[-1], qtype)
                writer.add_tensor(delta.tensor + suffix, gguf.quants.quantize(data.astype(np.float32), raw_type), raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(out_path.parent, write)
    return out_path


def default_adapter_path(adapter_dir: Path, outtype: str) -> Path:
    """Where an export goes unless told: beside the PEFT files, `<folder name>-<outtype>.gguf`."""
    return adapter_dir / f"{adapter_dir.resolve().name}-{outtype}.gguf"


def gguf_adapter_usage(adapter_gguf: Path, base_gguf: Path, adapter_dir: Path) -> str:
    """How to run the adapter: llama.cpp, llama-cpp-python, and why Ollama needs a merge."""
    return "\n".join([
        "use it with llama.cpp:",
        f"  llama-cli -m {base_gguf} --lora {adapter_gguf}",
        f"  llama-cli -m {base_gguf} --lora-scaled {adapter_gguf}:0.8     (older builds: --lora-scaled {adapter_gguf} 0.8)",
        f"  llama-server -m {base_gguf} --lora {adapter_gguf}",
        f"  python: llama_cpp.Llama(model_path=\"{base_gguf}\", lora_path=\"{adapter_gguf}\", lora_scale=1.0)",
        "Ollama: an ADAPTER line is not loaded by Ollama's newer engine; bake the LoRA in instead:",
        f"  lora-scripts merge --base {base_gguf} --lora {adapter_dir} --to gguf --out merged.gguf   (then `FROM ./merged.gguf`)",
    ])
