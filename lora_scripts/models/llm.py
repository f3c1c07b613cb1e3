"""Load a causal language model and its tokenizer from a local folder or a `.gguf` file.

Nothing is fetched from a hub: a path that does not exist is an error that says how to get the
model onto disk. GGUF files are dequantized by transformers (`gguf_file=`).
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lora_scripts.errors import UserError, read_json

# First bytes of the pre-GGUF llama.cpp formats (GGML, GGMF, GGJT), as read little-endian.
_GGML_MAGICS = {b"lmgg", b"fmgg", b"tjgg"}
# First bytes of PyTorch checkpoints: a zip archive (torch.save since 1.6) or a bare pickle.
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_llm_path(base_model: str) -> None:
    """Fail fast, before loading any weights, on a base model that cannot work."""
    path = Path(base_model)
    if not path.exists():
        hint = (
            f"; to use the hub model `{base_model}`, download it once with "
            f"`huggingface-cli download {base_model} --local-dir models/{path.name}` and set "
            f"base_model: models/{path.name}"
            if base_model.count("/") == 1 and not base_model.startswith((".", "/"))
            else ""
        )
        raise UserError(f"base_model not found: {base_model}{hint}")
    if path.is_file():
        _check_model_file(path)
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"base_model {path}: folder has no config.json; point it at a Hugging Face model folder or a .gguf file")
    model_type = read_json(config_file, "base_model").get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"base_model {path}: architecture `{model_type}` is not a causal language model "
            "transformers can train (text-generation needs e.g. llama, qwen2, mistral, gemma, phi3)"
        )
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors_header(weights)


def _check_safetensors_header(path: Path) -> None:
    """Read only the header: catches truncated and corrupt files before any weights load."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise UserError(f"base_model {path}: not a readable .safetensors file ({exc}); it is truncated or damaged, download it again") from None


def _check_model_file(path: Path) -> None:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic in _GGML_MAGICS:
        raise UserError(
            f"base_model {path}: this is a GGML v3 file (the format before GGUF, 2023), which no "
            "maintained library reads; convert it with llama.cpp's "
            "`convert_llama_ggml_to_gguf.py --input OLD.bin --output NEW.gguf` or use the model's "
            "Hugging Face folder or .gguf release"
        )
    if magic.startswith(_PICKLE_MAGICS):
        raise UserError(
            f"base_model {path}: not a GGUF file but a PyTorch pickle checkpoint, which can run code "
            "when loaded and is never unpickled here; for a text model use a Hugging Face model "
            "folder (safetensors weights) or a .gguf file"
        )
    if magic != b"GGUF":
        raise UserError(
            f"base_model {path}: not a GGUF file (starts with {magic!r}); for a text model use a "
            "Hugging Face model folder or a .gguf file"
        )
    if path.stat().st_size < 64:
        raise UserError(f"base_model {path}: the GGUF file is truncated ({path.stat().st_size} bytes)")
    stat = path.stat()
    _check_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _check_gguf(path: str, size: int, mtime_ns: int) -> None:
    """Parse the GGUF header and tensor table (memory-mapped, nothing dequantized).

    Cached per file version (`size`, `mtime_ns` only key the cache): a 100 MB GGUF takes
    seconds to parse and is checked more than once per run.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise UserError(f"base_model {path}: the GGUF file is truncated or damaged ({exc}); download it again") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UserError(
            f"base_model {path}: GGUF architecture `{architecture}` cannot be loaded by transformers "
            f"(supported: {supported}); use a Hugging Face model folder of this model instead"
        )


def _from_pretrained_args(base_model: str) -> tuple[str, dict[str, str]]:
    path = Path(base_model)
    return (str(path.parent), {"gguf_file": path.name}) if path.is_file() else (str(path), {})


def load_tokenizer(base_model: str):
    """Only the tokenizer of the base model (fast: no weights), offline."""
    check_llm_path(base_model)
    folder, kwargs = _from_pretrained_args(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"base_model {base_model}: its tokenizer cannot be loaded ({str(exc).strip().splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(base_model: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, AutoTokenizer]:
    """Load the base model (frozen later by PEFT) and its tokenizer, offline.

    A GGUF file is dequantized once; later runs load the float32 copy in the cache
    (`gguf_cache.py`).
    """
    from lora_scripts.models.gguf_cache import cached_copy, save_dequantized

    tokenizer = load_tokenizer(base_model)
    path = Path(base_model)
    cached = cached_copy(path) if path.is_file() else None
    if cached is not None:
        return _from_pretrained(base_model, str(cached), {}, dtype), tokenizer
    folder, kwargs = _from_pretrained_args(base_model)
    model = _from_pretrained(base_model, folder, kwargs, dtype)
    if kwargs and dtype == torch.float32:
        print(save_dequantized(path, model), flush=True)
    return model, tokenizer


def _from_pretrained(base_model: str, folder: str, kwargs: dict[str, str], dtype: torch.dtype) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    except pickle.UnpicklingError:
        raise UserError(
            f"base_model {base_model}: its pickle weights hold more than plain tensors, so the safe "
            "loader (weights_only=True) refused them; use a copy with .safetensors weights"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"base_model {base_model}: cannot be loaded ({first_line})") from None
