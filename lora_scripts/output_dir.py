"""Guards around `output_dir`: never overwrite a run by accident, refuse resumes that cannot be exact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_scripts.checkpoint import list_checkpoints
from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError

# Keys that may change between an interrupted run and its resume without breaking it.
RESUME_HARMLESS_KEYS = {
    "epochs", "max_steps", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
    "resume", "nan_policy", "output_name", "sample_prompts", "sample_every_n_steps", "sample_steps",
    "cache_latents_to_disk", "cache_dir",
    "fused_lora",  # the same computation up to float32 rounding (and absent from checkpoints older than it)
    "distributed",  # timeout and topology; a change of strategy or process count is refused by the loop
}


def check_output_dir(cfg: TrainConfig) -> list[Path]:
    """Check `output_dir` can take this run; return its existing checkpoints (oldest first).

    Raises UserError when it is a file, is not writable, or already holds a run and
    `resume` is off — so nothing trained is overwritten.
    """
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; choose a folder path")
    parent = nearest_existing(out)
    if not parent.is_dir():
        raise UserError(f"output_dir {out}: {parent} is a file, not a folder; choose another output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out}: no permission to write in {parent}; choose another output_dir")
    checkpoints = list_checkpoints(out)
    finished = (out / "adapter_config.json").exists() or (out / "training_config.yaml").exists()
    if (checkpoints or finished) and not cfg.resume:
        what = checkpoints[-1].name if checkpoints else "a finished LoRA"
        raise UserError(f"output_dir {out} already holds a run ({what}); set resume: true to continue it, or choose a new output_dir")
    return checkpoints


def check_free_space(folder: Path, trainable_bytes: int, keep: int | None) -> None:
    """Fail before training when the disk cannot hold the checkpoints this run will keep.

    A checkpoint holds the adapter, the parameters again and AdamW's two moments: ~4x the
    trainable bytes; without `save_total_limit` we ask for room for three.
    """
    needed = 4 * trainable_bytes * ((keep or 3) + 1)
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < needed:
        raise UserError(
            f"not enough disk space in {folder}: checkpoints need ~{needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free space, set save_total_limit, or choose another output_dir"
        )


def check_resume_compatible(meta: dict[str, Any], cfg: TrainConfig, fingerprint: dict[str, str]) -> None:
    """Refuse a resume whose config or data changed in a way that breaks an exact continuation."""
    saved = meta["config"]
    current = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    breaking = [k for k in changed if k not in RESUME_HARMLESS_KEYS]
    if breaking:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in breaking)
        raise UserError(f"cannot resume {cfg.output_dir}: the config changed ({details}); undo the change, or train into a new output_dir")
    for key, value in meta.get("fingerprint", {}).items():
        if fingerprint.get(key) != value:
            raise UserError(f"cannot resume {cfg.output_dir}: the {key} changed since the checkpoint was written; restore it, or train into a new output_dir")
    if changed:
        print(f"resume: allowed config changes: {', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed)}")


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


def probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder` (catches read-only mounts that os.access misses).

    Folders created for the probe are removed again, so a run that fails before its first
    write leaves nothing behind.
    """
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"output_dir {folder}: cannot write there ({exc.strerror})") from None
    finally:
        for path in created:  # deepest first
            if path.is_dir():
                path.rmdir()
