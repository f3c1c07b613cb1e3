"""A dequantized copy of each GGUF base model, so only the first run pays for dequantizing.

transformers dequantizes a GGUF file tensor by tensor in Python (SmolLM2-135M: ~18 s; larger
models minutes). The float32 result is saved once as a Hugging Face folder under
`$LORA_SCRIPTS_CACHE` (default `~/.cache/lora-scripts`), in `gguf/<sha256 of the file>/`, and
later runs load that folder in a second or two. The key is the file's content, so a re-downloaded
or edited file never reuses a stale copy. Models over `CACHE_LIMIT_BYTES` (float32) are not
cached: they would fill the disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedModel

from lora_scripts.atomic import fsync_dir, fsync_tree

CACHE_LIMIT_BYTES = 8 << 30
CACHE_ENV = "LORA_SCRIPTS_CACHE"


def cache_root() -> Path:
    """Where lora-scripts keeps caches shared between runs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-scripts")


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file (`size`, `mtime_ns` only key the memo)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def dequantized_folder(gguf_file: Path) -> Path:
    """The cache folder of this GGUF file's float32 weights (it may not exist yet)."""
    stat = gguf_file.stat()
    return cache_root() / "gguf" / _sha256(str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)[:32]


def cached_copy(gguf_file: Path) -> Path | None:
    """The complete dequantized copy of `gguf_file`, or None (a folder only gets its final name
    once complete)."""
    folder = dequantized_folder(gguf_file)
    return folder if (folder / "config.json").is_file() else None


def save_dequantized(gguf_file: Path, model: PreTrainedModel) -> str:
    """Keep a float32 model just dequantized from `gguf_file` for later runs; returns a note for
    the log (where it went, or why not). Never raises: a cache that cannot be written is skipped."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    folder = dequantized_folder(gguf_file)
    if size > CACHE_LIMIT_BYTES:
        return f"not caching the dequantized weights ({size / 2**30:.1f} GiB)"
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder.parent).free < 2 * size:
            return f"not caching the dequantized weights: less than {2 * size / 2**30:.1f} GiB free in {folder.parent}"
        # transformers keeps its GGUF quantizer on the model, which refuses save_pretrained; the
        # weights are plain float32 tensors by now, so there is nothing left for it to do.
        quantizer, model.hf_quantizer = model.hf_quantizer, None
        quantization_config = model.config.__dict__.pop("quantization_config", None)
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            model.hf_quantizer = quantizer
            if quantization_config is not None:
                model.config.quantization_config = quantization_config
        fsync_tree(tmp)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"could not cache the dequantized weights in {folder.parent} ({exc.strerror or exc})"
    return f"dequantized weights cached in {folder} for the next run"
