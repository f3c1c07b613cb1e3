"""One adapted layer as the tensors of a kohya / LyCORIS file, and back (incremental training,
`generate`). The layers are PEFT's: LoRA (also on 3x3 convs: LoCon), LoHa and LoKr, whose factor
names and shapes are LyCORIS' own (`hada_w1_a` [out, r], `hada_w1_b` [r, in·k·k], …; `lokr_w1`,
`lokr_w2` or `lokr_w2_a`/`lokr_w2_b`), so they are written as they are.

Scale, as the loaders apply it (A1111 `extensions-builtin/Lora/network.py` calc_scale, ComfyUI
`comfy/weight_adapter/lokr.py` / `loha.py`, LyCORIS `modules/lokr.py`): alpha / rank, the rank
read from `lora_down` / `hada_w1_b` / the LoKr `_b` factor. A LoKr module with two full factors
has no rank, and every loader then applies scale 1: PEFT's alpha / r is folded into `lokr_w2`
there (and alpha written as r, which LyCORIS itself does).
"""

from __future__ import annotations

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer

from lora_scripts.errors import UserError

ADAPTER_LAYERS = (LoraLayer, LoHaLayer, LoKrLayer)
KINDS = {LoraLayer: "lora", LoHaLayer: "loha", LoKrLayer: "lokr"}
LORA_SUFFIXES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}


def layer_kind(layer: torch.nn.Module) -> str:
    """lora, loha or lokr."""
    return next(kind for cls, kind in KINDS.items() if isinstance(layer, cls))


def layer_tensors(layer: torch.nn.Module, adapter: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The layer's tensors by kohya/LyCORIS suffix (`lora_down.weight`, `hada_w1_a`, `alpha`, …).

    `dtype` casts the factors (alpha stays float32). Raises UserError for DoRA, which these
    files would hold as `dora_scale` normalised another way than PEFT's (see config.py).
    """
    scale, rank = float(layer.scaling[adapter]), layer.r[adapter]
    if isinstance(layer, LoraLayer):
        if layer.use_dora[adapter]:
            raise UserError("a DoRA adapter cannot be saved in the kohya/A1111 format; use save_format: diffusers")
        factors = {suffix: getattr(layer, name)[adapter].weight.detach() for suffix, name in LORA_SUFFIXES.items()}
    else:
        factors = {name: getattr(layer, name)[adapter].detach() for name in layer.adapter_layer_names if adapter in getattr(layer, name)}
    if isinstance(layer, LoKrLayer) and not _lokr_rank(factors):
        factors["lokr_w2"] = factors["lokr_w2"] * scale
        scale = 1.0
    tensors = {suffix: value.to(dtype or value.dtype).contiguous() for suffix, value in factors.items()}
    # alpha = scale * rank reproduces PEFT's scale (alpha / r, or alpha / sqrt(r) with rsLoRA)
    tensors["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return tensors


def load_layer_tensors(layer: torch.nn.Module, adapter: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy one file module's tensors (by suffix) into the layer.

    Raises UserError when the module is another kind (LoRA / LoHa / LoKr) or has other factors
    than the layer (another rank or network), or its alpha / rank scale differs from the layer's.
    """
    kind = layer_kind(layer)
    suffixes = set(tensors) - {"alpha"}
    file_kind = "lora" if "lora_down.weight" in suffixes else "loha" if "hada_w1_a" in suffixes else "lokr"
    if file_kind != kind:
        raise UserError(f"{where} is {file_kind}, this run trains {kind}; set network_type: {file_kind}")
    if kind == "lora":
        params = {suffix: getattr(layer, name)[adapter].weight for suffix, name in LORA_SUFFIXES.items()}
        rank: int | None = tensors["lora_down.weight"].shape[0]
    else:
        params = {name: getattr(layer, name)[adapter] for name in layer.adapter_layer_names if adapter in getattr(layer, name)}
        rank = tensors["hada_w1_b"].shape[0] if kind == "loha" else _lokr_rank(tensors)
    mismatched = [suffix for suffix, param in params.items() if tensors.get(suffix, param).numel() != param.numel()]
    if set(params) != suffixes or mismatched:
        raise UserError(f"{where} holds factors {_shapes(tensors, suffixes)}, this run's layer {_shapes(params, set(params))}; was it trained with another lora_rank or conv_dim?")
    scale = float(layer.scaling[adapter])
    if rank is not None:
        alpha = float(tensors.get("alpha", torch.tensor(float(rank))))
        if abs(alpha / rank - scale) > 1e-6 * max(1.0, scale):
            raise UserError(f"{where}: alpha {alpha:g} (scale {alpha / rank:g}) differs from this run's scale {scale:g}; set lora_alpha: {alpha:g}")
    with torch.no_grad():
        for suffix, param in params.items():
            value = tensors[suffix] / scale if rank is None and suffix == "lokr_w2" else tensors[suffix]
            param.copy_(value.reshape(param.shape))


def _lokr_rank(factors: dict[str, torch.Tensor]) -> int | None:
    """The rank of a LoKr module's decomposed factor (w2_b, else w1_b); None when both are full."""
    factor = factors.get("lokr_w2_b", factors.get("lokr_w1_b"))
    return None if factor is None else factor.shape[0]


def _shapes(tensors: dict[str, torch.Tensor], names: set[str]) -> str:
    return ", ".join(f"{name} {list(tensors[name].shape)}" for name in sorted(names))
