"""What a run shows while it trains and after: read from its files only, never from the process.

Scalars come from the TensorBoard event files the trainer writes in `output_dir/logs/` (the one
writer, `tracking.py`); the step counter from the progress bar in the job's log; samples from
`output_dir/samples/step_N.png`; the final files from the top of `output_dir`.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

LOG_TAIL_BYTES = 64 * 1024
_BAR = re.compile(r"(\d+)/(\d+) \[")  # tqdm: " 40%|████      | 4/10 [00:00<00:01, …]"
_PLAN = re.compile(r"^plan: (\d+) steps", re.M)
_SAMPLE = re.compile(r"^step_(\d+)\.png$")
# TensorBoard tag -> the name the page shows (`tracking.Tracker.log` names them).
_EVAL_TAG = "eval/loss"
_TRAIN_PREFIX = "train/"


def log_tail(log: Path, lines: int = 120) -> list[str]:
    """The last lines of a log, each progress-bar redraw (`\\r`) collapsed to its latest state."""
    if not log.is_file():
        return []
    with log.open("rb") as fh:
        fh.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
        text = fh.read().decode("utf-8", errors="replace")
    shown = []
    for line in text.split("\n"):
        parts = [part for part in line.split("\r") if part.strip()]
        if parts:
            shown.append(parts[-1].rstrip())
    return shown[-lines:]


def progress(tail: list[str]) -> dict[str, int] | None:
    """`{"step", "total"}` from the newest progress bar (or the plan line) in the log, if any."""
    for line in reversed(tail):
        bars = _BAR.findall(line)
        if bars:
            step, total = bars[-1]
            return {"step": int(step), "total": int(total)}
    plans = _PLAN.findall("\n".join(tail))
    return {"step": 0, "total": int(plans[-1])} if plans else None


class ScalarReader:
    """TensorBoard scalars of logs folders, read incrementally: each event file keeps its
    EventAccumulator, whose Reload() reads only what was appended since the last call."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[int, object]] = {}  # event file -> (size read, accumulator)
        self._lock = threading.Lock()

    def read(self, logs: Path) -> dict[str, list[list[float]]]:
        """`{name: [[step, value], …]}`; a step logged twice (before and after a resume) keeps its latest value."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        by_step: dict[str, dict[int, float]] = {}
        files = sorted(logs.glob("events.out.tfevents.*")) if logs.is_dir() else []
        with self._lock:
            for path in files:  # one file per start of the run, oldest first (the name holds the time)
                size, accumulator = self._files.get(path, (-1, None))
                if accumulator is None:
                    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
                if path.stat().st_size != size:
                    size = path.stat().st_size
                    accumulator.Reload()
                    self._files[path] = (size, accumulator)
                for tag in accumulator.Tags().get("scalars", []):
                    series = by_step.setdefault("eval_loss" if tag == _EVAL_TAG else tag.removeprefix(_TRAIN_PREFIX), {})
                    series.update((event.step, event.value) for event in accumulator.Scalars(tag))
        return {name: [[step, series[step]] for step in sorted(series)] for name, series in by_step.items()}


def samples(output_dir: Path) -> list[dict[str, Any]]:
    """The sample images written so far, by step (`step_0.png`, if rendered, is before training)."""
    folder = output_dir / "samples"
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SAMPLE.match(p.name))] if folder.is_dir() else []
    return [{"step": step, "path": f"samples/{path.name}"} for step, path in sorted(found)]


def final_files(output_dir: Path) -> list[dict[str, Any]]:
    """The files at the top of `output_dir` (the LoRA, its exports, config, curve), with sizes."""
    if not output_dir.is_dir():
        return []
    files = [p for p in sorted(output_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return [{"name": p.name, "size": p.stat().st_size, "lora": p.suffix in (".safetensors", ".gguf")} for p in files]


def checkpoints(output_dir: Path) -> list[str]:
    """Names of the complete `step_N` checkpoints (what a resume continues from)."""
    from lora_scripts.checkpoint import list_checkpoints

    return [p.name for p in list_checkpoints(output_dir)]
