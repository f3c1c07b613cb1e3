"""Re-factorise a LoRA to another rank by SVD, in the format it came in (kohya file or PEFT folder).

Each module's update is delta = scale * up @ down (conv weights flattened to [out, in*kh*kw], as
kohya's `networks/resize_lora.py` does for LoCon 3x3 convs). The SVD of that product is taken
from the small factors (QR of up and down^T, then the SVD of an r x r matrix), which is exact and
costs O((out + in) r^2) rather than an SVD of the full matrix. Keeping the k largest singular
values is the best rank-k approximation (Eckart-Young); the share of the squared Frobenius norm
kept, sum(S[:k]^2) / sum(S^2), is reported as the module's retained energy. At k >= the
module's rank nothing is lost.

Output follows kohya's convention: up = U_k * S_k, down = V_k^T, and alpha = scale * k (PEFT
rsLoRA: scale * sqrt(k)), so every module keeps its scale and the weights stay unscaled.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_scripts.atomic import write_atomically
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import save_kohya_lora
from lora_scripts.export.lora_files import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    LoraSource,
    load_tensors,
    lora_modules,
    module_scale,
    open_lora,
)


@dataclass
class Factors:
    """One module's LoRA as two matrices: delta = scale * up @ down."""

    name: str
    up: torch.Tensor  # [out, r] float64
    down: torch.Tensor  # [r, in * kh * kw] float64
    scale: float
    up_tail: tuple[int, ...]  # trailing dims of the stored up tensor after the rank ((1, 1) for convs)
    down_tail: tuple[int, ...]  # trailing dims of the stored down tensor after the rank ((in, 3, 3) for 3x3)
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * self.up @ self.down


@dataclass
class Resized:
    """How one module was resized."""

    name: str
    old_rank: int
    new_rank: int
    energy: float  # share of sum(S^2) kept


def read_factors(source: LoraSource, action: str) -> tuple[list[Factors], dict[str, torch.Tensor]]:
    """The LoRA factors of a kohya or PEFT source, plus its other tensors (PEFT modules_to_save, biases).

    Raises UserError for formats and methods whose update is not up @ down (LoHa, LoKr, DoRA).
    """
    if source.format not in ("kohya", "peft"):
        hint = {"diffusers": "lora-scripts convert --to kohya first", "gguf": "use the PEFT folder it was exported from"}
        raise UserError(f"{source.path}: {action} reads kohya files and PEFT folders, not {source.format} LoRAs; {hint[source.format]}")
    if source.format == "peft" and not source.config:
        raise UserError(f"{source.path}: no {PEFT_CONFIG} beside it, so its alpha is unknown; point at the adapter folder")
    modules = lora_modules(source)
    names = {"loha": "LoHa", "lokr": "LoKr"}
    other = sorted(names[kind] for kind in {m.kind for m in modules} - {"lora"}) + (["DoRA"] if any(m.dora for m in modules) or source.config.get("use_dora") else [])
    if other:
        raise UserError(f"{source.path}: {action} works on plain LoRA/LoCon factors; this is {'/'.join(other)}, whose update is not up @ down")
    if not modules:
        raise UserError(f"{source.path}: no LoRA modules found")
    tensors = load_tensors(source)
    factors, used = [], set()
    for module in modules:
        down, up = tensors[module.keys["down"]], tensors[module.keys["up"]]
        used.update(module.keys.values())
        factors.append(Factors(module.name, up.reshape(up.shape[0], module.rank).double(),
                               down.reshape(module.rank, -1).double(), module_scale(source, module),
                               tuple(up.shape[2:]), tuple(down.shape[1:]), down.dtype))
    return factors, {key: value for key, value in tensors.items() if key not in used}


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down from its factors: up = Qu Ru, down^T = Qd Rd, svd(Ru Rd^T)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def truncate(f: Factors, rank: int, energy_target: float | None = None) -> tuple[Factors, Resized]:
    """`f` at rank min(rank, its rank) — or, with `energy_target`, the smallest rank keeping that
    share of sum(S^2), capped at `rank` — with the same scale (kohya: alpha = scale * new rank)."""
    u, s, vh = low_rank_svd(f.up, f.down)
    squares = s.square()
    total = float(squares.sum())
    cumulative = squares.cumsum(0) / total if total > 0 else torch.ones_like(squares)
    keep = min(rank, len(s))
    if energy_target is not None:
        # kohya resize_lora.py --dynamic_method sv_fro P keeps norm share P, i.e. energy P**2
        keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor(energy_target, dtype=cumulative.dtype) - 1e-12)) + 1)
    keep = max(keep, 1)
    energy = float(cumulative[keep - 1])
    new = replace(f, up=u[:, :keep] * s[:keep], down=vh[:keep])
    return new, Resized(f.name, f.rank, keep, energy)


def resize_lora(path: str | Path, out: str | Path, rank: int, energy_target: float | None = None) -> list[Resized]:
    """Write `path` re-factorised to `rank` (or per module by `energy_target`) to `out`, same format.

    Raises UserError for an unsupported input, a rank below 1, or an `out` that exists.
    """
    source = open_lora(path)
    out = check_output(out, source.format, rank)
    if energy_target is not None and not 0 < energy_target <= 1:
        raise UserError(f"--dynamic-energy {energy_target}: give the share of energy to keep, in (0, 1], e.g. 0.95")
    factors, others = read_factors(source, "resize")
    results = [truncate(f, rank, energy_target) for f in factors]
    resized = [new for new, _ in results]
    reports = [report for _, report in results]
    if source.format == "kohya":
        old_dims = sorted({r.old_rank for r in reports})
        comment = (f"dimension is resized from {'/'.join(map(str, old_dims))} to "
                   + (f"{rank}" if energy_target is None else f"dynamic (energy {energy_target}, max {rank})"))
        metadata = {**source.metadata, **network_dims(resized)}
        metadata["ss_training_comment"] = f"{comment}; {source.metadata.get('ss_training_comment', '')}".rstrip("; ")
        write_kohya(out, resized, metadata)
    else:
        write_peft(out, source, resized, others)
    return reports


def check_output(out: str | Path, fmt: str, rank: int | None) -> Path:
    """`out` as a Path, refusing an existing path, a wrong suffix for a kohya file, or rank < 1."""
    out = Path(out)
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: a LoRA needs rank 1 or more")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output path (nothing was written)")
    if fmt == "kohya" and out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: a kohya LoRA is one .safetensors file; name the output *.safetensors")
    if fmt == "peft" and out.suffix:
        raise UserError(f"{out}: a PEFT adapter is a folder; give a folder path without a suffix")
    return out


def network_dims(factors: list[Factors]) -> dict[str, str]:
    """kohya's ss_network_dim / ss_network_alpha: the shared value, or "Dynamic" when modules differ."""
    dims = {f.rank for f in factors}
    alphas = {round(f.scale * f.rank, 6) for f in factors}
    return {"ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic"}


def kohya_state(factors: list[Factors]) -> dict[str, torch.Tensor]:
    """kohya tensors: lora_down [k, *down_tail], lora_up [out, k, *up_tail], alpha = scale * k (float32)."""
    state = {}
    for f in factors:
        state[f"{f.name}.lora_down.weight"] = f.down.reshape(f.rank, *f.down_tail).to(f.dtype).contiguous()
        state[f"{f.name}.lora_up.weight"] = f.up.reshape(f.up.shape[0], f.rank, *f.up_tail).to(f.dtype).contiguous()
        state[f"{f.name}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
    return state


def write_kohya(out: Path, factors: list[Factors], metadata: dict[str, str]) -> None:
    """Save as a kohya file; save_kohya_lora recomputes sshs_model_hash / sshs_legacy_hash."""
    kept = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    save_kohya_lora(out, kohya_state(factors), kept)


def write_peft(out: Path, source: LoraSource, factors: list[Factors], others: dict[str, torch.Tensor],
               config_updates: dict | None = None) -> None:
    """Save as a PEFT folder: adapter_model.safetensors, adapter_config.json with r / lora_alpha and
    (where modules differ) rank_pattern / alpha_pattern keyed by full module path, and the other
    top-level files of the source folder (README.md, training_config.yaml…) copied as they were."""
    config = {**source.config, **(config_updates or {})}
    rslora = bool(config.get("use_rslora"))
    ranks = {f.name.removeprefix(PEFT_PREFIX): f.rank for f in factors}
    alphas = {path: _number(f.scale * (math.sqrt(f.rank) if rslora else f.rank)) for path, f in zip(ranks, factors)}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config.update(
        r=default_rank, lora_alpha=default_alpha,
        rank_pattern={path: r for path, r in ranks.items() if r != default_rank},
        alpha_pattern={path: a for path, a in alphas.items() if a != default_alpha},
    )
    tensors = dict(others)
    for f in factors:
        tensors[f"{f.name}.lora_A.weight"] = f.down.reshape(f.rank, *f.down_tail).to(f.dtype).contiguous()
        tensors[f"{f.name}.lora_B.weight"] = f.up.reshape(f.up.shape[0], f.rank, *f.up_tail).to(f.dtype).contiguous()

    def write(tmp: Path) -> None:
        for extra in sorted(source.weights.parent.iterdir()):
            if extra.is_file() and extra.name not in (PEFT_WEIGHTS, PEFT_CONFIG) and not extra.name.startswith("."):
                shutil.copy2(extra, tmp / extra.name)
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    write_atomically(out, write)


def _number(value: float) -> float | int:
    """An alpha as JSON: integral values as int (as PEFT writes them), others rounded off float noise."""
    rounded = round(value, 9)
    return int(rounded) if rounded == int(rounded) else rounded


def energy_summary(reports: list[Resized], worst: int = 5) -> list[str]:
    """Lines summarising retained energy: modules, ranks, min / mean, and the worst modules."""
    energies = [r.energy for r in reports]
    ranks = Counter(r.new_rank for r in reports)
    lines = [
        f"modules: {len(reports)}; new ranks: " + ", ".join(f"{k} x{n}" for k, n in sorted(ranks.items())),
        f"retained energy (share of sum S^2 kept): min {min(energies):.6f}, mean {sum(energies) / len(energies):.6f}",
    ]
    lossy = sorted((r for r in reports if r.energy < 1 - 1e-9), key=lambda r: r.energy)[:worst]
    lines += [f"  {r.name}  rank {r.old_rank} -> {r.new_rank}  energy {r.energy:.6f}" for r in lossy]
    return lines
