"""Weighted merge of several LoRAs into one, as kohya's `networks/merge_lora.py --concat` and
`networks/svd_merge_lora.py` do, for kohya files and PEFT folders.

Module by module, the merged update is sum_i w_i * delta_i with delta_i = scale_i * up_i @ down_i.
Without a rank the factors are stacked (rank = sum of the inputs' ranks, exact): up = [c_1^½ up_1 |
c_2^½ up_2 | …], down = [sign(c_1) c_1^½ down_1; …] with c_i = w_i * scale_i, and scale 1
(alpha = rank). kohya's concat keeps the first file's alpha over the summed rank, which changes
the scale; here the result equals the weighted sum. With a rank, that stacked product is cut to
the rank by SVD (`resize.truncate`), which is the SVD of the summed update.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_scripts.errors import UserError
from lora_scripts.export.lora_files import LoraSource, lora_modules, open_lora
from lora_scripts.export.lora_info import base_of
from lora_scripts.export.resize import Factors, Resized, check_output, network_dims, read_factors, truncate, write_kohya, write_peft

# metadata of the first kohya file that still describes the merge (the base it was trained for)
KOHYA_BASE_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.sai_model_spec",
                   "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
                   "modelspec.prediction_type")


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`PATH:WEIGHT` (weight defaults to 1.0; a path may itself contain ':')."""
    path, _, weight = text.rpartition(":")
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(text), 1.0


def merge_loras(inputs: list[tuple[Path, float]], out: str | Path, rank: int | None = None) -> list[Resized]:
    """Write the weighted merge of `inputs` to `out` in their common format.

    Returns one report per module (retained energy 1.0 for the exact concat). Raises UserError
    for fewer than two inputs, mixed formats or bases, shape mismatches, or an existing `out`.
    """
    if len(inputs) < 2:
        raise UserError("merge-loras needs at least two --lora PATH:WEIGHT")
    sources = [open_lora(path) for path, _ in inputs]
    formats = sorted({source.format for source in sources})
    if len(formats) > 1:
        raise UserError(f"cannot merge LoRAs of different formats ({', '.join(formats)}); convert them to one format first")
    out = check_output(out, formats[0], rank)
    _check_same_base(sources)
    parts: dict[str, list[tuple[Factors, float]]] = {}
    for source, (_, weight) in zip(sources, inputs):
        factors, others = read_factors(source, "merge-loras")
        if others:
            raise UserError(f"{source.path}: holds {len(others)} tensor(s) besides LoRA factors (modules_to_save, biases), which cannot be merged")
        for f in factors:
            parts.setdefault(f.name, []).append((f, weight))
    merged = [_concat(name, items) for name, items in sorted(parts.items())]
    reports = [Resized(f.name, f.rank, f.rank, 1.0) for f in merged]
    if rank is not None:
        cut = [truncate(f, rank) for f in merged]
        merged, reports = [f for f, _ in cut], [r for _, r in cut]
    how = ", ".join(f"{path.name}:{weight:g}" for path, weight in inputs)
    if formats[0] == "kohya":
        metadata = {key: sources[0].metadata[key] for key in KOHYA_BASE_KEYS if key in sources[0].metadata}
        metadata.update(network_dims(merged), ss_network_module="networks.lora",
                        ss_training_comment=f"merged from {how}" + (f", SVD to rank {rank}" if rank else ", concatenated"),
                        **{"modelspec.title": out.stem, "modelspec.merged_from": how})
        write_kohya(out, merged, metadata)
    else:
        write_peft(out, sources[0], merged, {}, {"target_modules": _targets(sources, merged)})
    return reports


def _check_same_base(sources: list[LoraSource]) -> None:
    """Refuse LoRAs whose known families differ (sd1 vs sdxl, llama vs qwen2)."""
    families = {}
    for source in sources:
        family = base_of(source, lora_modules(source))[0]
        if family is not None:
            families.setdefault(family, source.path)
    if len(families) > 1:
        named = ", ".join(f"{path.name} is {family}" for family, path in families.items())
        raise UserError(f"cannot merge LoRAs for different base models ({named})")


def _concat(name: str, items: list[tuple[Factors, float]]) -> Factors:
    """One module's inputs stacked along the rank: exact weighted sum, scale 1."""
    first = items[0][0]
    for f, _ in items[1:]:
        if (f.up.shape[0], f.down.shape[1], f.up_tail, f.down_tail) != (first.up.shape[0], first.down.shape[1], first.up_tail, first.down_tail):
            raise UserError(f"module {name} has shape {tuple(first.up.shape[:1]) + first.down_tail} in one LoRA and "
                            f"{tuple(f.up.shape[:1]) + f.down_tail} in another: they were trained on different base models")
    ups, downs = [], []
    for f, weight in items:
        coefficient = weight * f.scale
        root = abs(coefficient) ** 0.5
        ups.append(f.up * root)
        downs.append(f.down * (root if coefficient >= 0 else -root))
    dtype = first.dtype
    for f, _ in items[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    return Factors(name, torch.cat(ups, 1), torch.cat(downs, 0), 1.0, first.up_tail, first.down_tail, dtype)


def _targets(sources: list[LoraSource], merged: list[Factors]) -> list[str] | str:
    """PEFT target_modules of the merge: the shared value, or the layer names of every merged module."""
    values = [source.config.get("target_modules") for source in sources]
    if all(value == values[0] for value in values):
        return values[0]
    return sorted({f.name.rsplit(".", 1)[-1] for f in merged})
