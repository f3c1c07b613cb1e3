"""Bake a PEFT text LoRA into its base model at a strength: a Hugging Face folder, or a GGUF model.

`merge_text_to_hf` merges with PEFT in float32 (`merge_and_unload`) and writes safetensors
shards plus the tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`.
`merge_text_to_gguf` works on the base GGUF itself, the file Ollama's `FROM` and llama.cpp load:
every KV entry (tokenizer, chat template) is kept, each adapted tensor is dequantized, given
strength * scale * B @ A (B with the same q/k RoPE permutation as the GGUF adapter export) and
re-encoded as f16 or q8_0. Tensors the LoRA does not touch are copied byte for byte: re-encoding
them would change nothing llama.cpp computes except to add rounding (Q4_1 -> q8_0) or size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError, read_json
from lora_scripts.export.gguf_adapter import (
    OUTTYPES,
    BaseGGUF,
    GGUFDelta,
    plan_deltas,
    read_base_gguf,
    read_peft_adapter,
    refuse_existing,
    stored_type,
)

GGUF_MERGE_OUTTYPES = ("f16", "q8_0")
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
MAX_SHARD_SIZE = "2GB"


def merge_text_to_hf(base_model: str, adapter_dir: Path, out: Path, strength: float = 1.0) -> Path:
    """Merge the PEFT adapter into `base_model` (HF folder or .gguf) and save an HF model folder.

    Saved in the base folder's dtype (float32 for a GGUF base, whose weights were dequantized).
    Raises UserError for an existing `out`, an adapter that does not fit the base, or a merge
    that produced NaN/inf.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from lora_scripts.models.llm import check_llm_path, load_llm

    refuse_existing(out)
    check_llm_path(base_model)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"lora {adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    save_dtype = _folder_dtype(Path(base_model))
    model, tokenizer = load_llm(base_model, torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"lora {adapter_dir}: does not fit base {base_model} ({reason}); it was trained for another model") from None
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(strength)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise UserError(f"lora {adapter_dir}: merging at strength {strength:g} gives non-finite weights ({exc})") from None
    # A model loaded from GGUF keeps transformers' GGUF quantizer, which refuses save_pretrained;
    # its weights are plain dequantized tensors by now, so the quantizer has nothing left to do.
    merged.hf_quantizer = None
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.to(save_dtype)

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp / out.name), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(str(tmp / out.name))

    write_atomically(out.parent, write)
    return out


def _folder_dtype(base: Path) -> torch.dtype:
    """The dtype an HF base folder declares (config.json `dtype` / `torch_dtype`); float32 otherwise."""
    config_file = base / "config.json"
    if not config_file.is_file():
        return torch.float32
    config = read_json(config_file, "base")
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def merge_text_to_gguf(base_gguf: Path, adapter_dir: Path, out: Path, strength: float = 1.0, outtype: str = "f16") -> Path:
    """Merge the PEFT adapter into the base GGUF model and write a GGUF model at `outtype`.

    Adapted tensors are stored as `outtype` (f16 or q8_0; q8_0 rows that are not whole blocks
    as f16), the rest as in the base. Prints a warning when the base is quantized. Raises
    UserError as `export_gguf_adapter` does, and for an existing `out`.
    """
    if outtype not in GGUF_MERGE_OUTTYPES:
        raise UserError(f"--outtype {outtype}: a merged GGUF is written as {' or '.join(GGUF_MERGE_OUTTYPES)}")
    refuse_existing(out)
    base = read_base_gguf(base_gguf)
    deltas = {d.tensor: d for d in plan_deltas(read_peft_adapter(adapter_dir), base, adapter_dir)}
    qtype = OUTTYPES[outtype][0]
    quantized = sorted({base.tensors[name].tensor_type.name for name in deltas} - {t.name for t in FLOAT_TYPES})
    if quantized:
        print(
            f"warning: base {base_gguf.name} stores the adapted weights as {'/'.join(quantized)}; they are merged "
            f"into their dequantized values and re-encoded as {outtype}, so the merged weights keep the base's "
            f"quantization error plus {outtype} rounding (a float base gives the exact merge)",
            file=sys.stderr,
        )

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp / out.name, base.arch)
        _copy_metadata(base, writer)
        for tensor in base.reader.tensors:
            if tensor.name in deltas:
                shape = tuple(int(n) for n in reversed(tensor.shape))  # numpy order: [out, in]
                raw_type = stored_type(shape[-1], qtype)
                nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, raw_type)))
                writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), nbytes, raw_type)
            else:
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # one tensor in memory at a time: a 7B base never needs its full float32 size in RAM
        for tensor in base.reader.tensors:
            delta = deltas.get(tensor.name)
            if delta is None:
                writer.write_tensor_data(tensor.data, tensor_endianess=base.reader.endianess)
            else:
                writer.write_tensor_data(_merged(tensor, delta, strength, qtype))
        writer.close()

    write_atomically(out.parent, write)
    return out


def _copy_metadata(base: BaseGGUF, writer: gguf.GGUFWriter) -> None:
    """Every KV entry of the base (gguf's own scripts/gguf_new_metadata.py copies them so)."""
    alignment = base.reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in base.reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer adds general.architecture itself
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def _merged(tensor: gguf.ReaderTensor, delta: GGUFDelta, strength: float, qtype: QType) -> np.ndarray:
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    weight += np.float32(strength * delta.scale) * (delta.b @ delta.a)
    if not np.isfinite(weight).all():
        raise UserError(f"merging at strength {strength:g} gives non-finite values in {tensor.name}")
    return gguf.quants.quantize(weight, stored_type(weight.shape[-1], qtype))
