"""Files of the bad-input corpus that are binary or awkward to commit, written at test time.

A case's `files:` maps a path inside the case folder to one of the GENERATORS below. Every
generator gets that path and the test's good inputs (`tiny_llm`: the tiny Llama folder, …).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

MARKER = "PWNED"  # an unpickled evil pickle creates this file beside itself


class EvilPickle:
    """Unpickling this object creates the file MARKER: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def evil_pickle(path: Path, inputs: dict[str, Path]) -> None:
    """A torch checkpoint (zip pickle) whose loading would run code."""
    torch.save({"state_dict": {"weight": torch.zeros(2), "payload": EvilPickle(path.parent / MARKER)}}, path)


def ggml_v3(path: Path, inputs: dict[str, Path]) -> None:
    """The header of a llama.cpp GGJT v3 file (`.ggmlv3.q4_0.bin`), the format before GGUF."""
    path.write_bytes(b"tjgg" + struct.pack("<I", 3) + struct.pack("<7I", 32000, 4096, 256, 32, 32, 128, 2) + bytes(64))


def _gguf(path: Path, architecture: str, shape: tuple[int, int]) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_truncated(path: Path, inputs: dict[str, Path]) -> None:
    """A GGUF file cut off in the middle of its tensor data (an interrupted download)."""
    _gguf(path, "llama", (256, 256))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def gguf_rwkv(path: Path, inputs: dict[str, Path]) -> None:
    """A well-formed GGUF of an architecture transformers cannot load."""
    _gguf(path, "rwkv7", (4, 4))


def gguf_header_only(path: Path, inputs: dict[str, Path]) -> None:
    """Only the first bytes of a GGUF file."""
    path.write_bytes(b"GGUF" + struct.pack("<I", 3))


def safetensors_truncated(path: Path, inputs: dict[str, Path]) -> None:
    """A safetensors file whose second half is missing."""
    save_file({"model.embed_tokens.weight": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def safetensors_bad_header(path: Path, inputs: dict[str, Path]) -> None:
    """A safetensors file whose JSON header is garbage."""
    header = b"{this is not json}      "
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(256))


def lora_wrong_shape(path: Path, inputs: dict[str, Path]) -> None:
    """PEFT adapter weights made for a wider model (hidden size 48, the tiny Llama has 32)."""
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 48), f"{prefix}.lora_B.weight": torch.zeros(48, 4)}, str(path))


def tokenizer_of_tiny_llm(path: Path, inputs: dict[str, Path]) -> None:
    """The tiny Llama's tokenizer files, so loading gets as far as the weights."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(inputs["tiny_llm"] / name, path / name)


def gbk_qa_csv(path: Path, inputs: dict[str, Path]) -> None:
    """A Chinese CSV saved as GBK (what Excel on a Chinese Windows writes by default)."""
    path.write_bytes("question,answer\n你好吗？,我很好。\n".encode("gbk"))


def gbk_metadata_csv(path: Path, inputs: dict[str, Path]) -> None:
    """An image metadata.csv with Chinese captions saved as GBK."""
    path.write_bytes("filename,prompt\ngood.png,水墨画，山\n".encode("gbk"))


def llm_safetensors(path: Path, inputs: dict[str, Path]) -> None:
    """A valid safetensors file holding a language model's weights, not Stable Diffusion's."""
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(path))


def empty_dir(path: Path, inputs: dict[str, Path]) -> None:
    """An empty folder (git keeps none)."""
    path.mkdir(parents=True, exist_ok=True)


def link_outside_folder(path: Path, inputs: dict[str, Path]) -> None:
    """A symlink in a data folder pointing at `../outside<suffix>`, outside that folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(path.parent.parent / f"outside{path.suffix}", path.parent), path)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_good(path: Path, inputs: dict[str, Path]) -> None:
    """A valid 64x64 RGB PNG."""
    path.write_bytes(_png(64, 64))


def png_truncated(path: Path, inputs: dict[str, Path]) -> None:
    """A PNG cut off in its pixel data."""
    path.write_bytes(_png(64, 64)[:600])


def png_zero_bytes(path: Path, inputs: dict[str, Path]) -> None:
    """An empty file named .png."""
    path.write_bytes(b"")


def png_bomb(path: Path, inputs: dict[str, Path]) -> None:
    """A decompression bomb: a valid PNG header declaring 50000 x 50000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1024))) + chunk(b"IEND", b""))


GENERATORS: dict[str, Callable[[Path, dict[str, Path]], None]] = {
    f.__name__: f
    for f in (
        evil_pickle, ggml_v3, gguf_truncated, gguf_rwkv, gguf_header_only, safetensors_truncated,
        safetensors_bad_header, lora_wrong_shape, tokenizer_of_tiny_llm, gbk_qa_csv, gbk_metadata_csv,
        llm_safetensors, empty_dir, link_outside_folder, png_good, png_truncated, png_zero_bytes, png_bomb,
    )
}
