"""Crash-safe checkpoints: `output_dir/step_{N}/`, written to a temporary folder and renamed.

A checkpoint holds the task's adapter files (usable on their own) plus what a bit-exact resume
needs: the LoRA parameters, optimizer, scheduler, gradient scaler, every RNG state of every
process (each draws its own dropout and augmentations) and the step. Pickle is never loaded from
outside: training state is read back with `weights_only=True`.

Under FSDP the parameters and optimizer state are sharded over the processes; `full_parameters`
and `optimizer_state` gather them (every process takes part) so a checkpoint and the final LoRA
hold whole tensors, never shards, and `load_trainable_state` / `load_optimizer_state` shard them
again on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lora_scripts.atomic import fsync_dir, fsync_tree
from lora_scripts.errors import UserError
from lora_scripts.faults import maybe_kill

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
PARAMS_FILE = "lora_params.safetensors"
OPTIM_FILE = "optimizer.pt"


def rng_state() -> dict[str, Any]:
    """Every random state that affects training."""
    return {
        "python": _to_lists(random.getstate()),
        "numpy": _to_lists(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def all_rng_states() -> list[dict[str, Any]] | None:
    """Every process's `rng_state()` in rank order, on the main process (None on the others).
    Every process must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rng_state(), gathered, dst=0)
    return gathered


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_to_lists(v) for v in value]
    return value


@contextmanager
def write_errors_explained(target: Path, output_dir: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write (disk full, I/O error) into one line naming the last good checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        done = list_checkpoints(output_dir)
        last = f"the last complete checkpoint {done[-1]} is intact" if done else "no checkpoint was completed yet"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot write {target} ({reason}); {last}; free disk space, then rerun with resume: true") from exc


def save_checkpoint(
    output_dir: Path,
    step: int,
    write_adapter: Callable[[Path], Any],
    params: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int | None,
) -> Path:
    """Write `step_{step}` atomically, then prune to the newest `keep` checkpoints."""
    final = output_dir / f"step_{step}"
    tmp = output_dir / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with write_errors_explained(final, output_dir, cleanup=tmp):
        tmp.mkdir(parents=True)
        write_adapter(tmp)
        save_file({k: v.contiguous().cpu() for k, v in params.items()}, str(tmp / PARAMS_FILE))
        torch.save(training_state, tmp / OPTIM_FILE)
        maybe_kill("kill_during_save", step)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: swap, never leave a gap
        old = output_dir / f".step_{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(output_dir)
    if keep is not None:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (a folder only gets its final name when complete)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def load_trainable_state(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA parameters (a checkpoint's lora_params.safetensors) into `model`.

    Raises UserError when the names differ from the model's trainable parameters.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if own.keys() != params.keys():
        raise UserError(f"the checkpoint's LoRA parameters do not match this model's (e.g. {sorted(own.keys() ^ params.keys())[0]}); resume with the config that wrote it")
    with torch.no_grad():
        for name, param in own.items():
            value = params[name]
            if isinstance(param, DTensor):  # FSDP: this process keeps its shard of the saved tensor
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards this model's parameters over the processes."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


@contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every trainable parameter FSDP shards is whole on every process, so the task's own
    save functions see a normal model (LoRA parameters only: the frozen base stays sharded).
    Every process must enter; with unsharded parameters it does nothing."""
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                module._parameters[name] = torch.nn.Parameter(param.full_tensor().detach().clone())
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save: as is, or gathered whole when FSDP shards it (every process
    must call it then; the main process gets the whole state)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what `optimizer_state` saved (sharded again under FSDP)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=StateDictOptions(full_state_dict=True))


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read (meta, LoRA params, training state) of one checkpoint."""
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        params = load_file(str(folder / PARAMS_FILE))
        state = torch.load(folder / OPTIM_FILE, weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {folder} is damaged ({str(exc).splitlines()[0]}); delete that folder to resume from the one before") from None
    return meta, params, state
