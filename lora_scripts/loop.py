"""The training loop shared by every task: setup, a plain step loop, checkpoints, final export.

One optimizer step consumes `gradient_accumulation_steps` micro-batches, taken in a seeded
per-epoch order (`schedule.py`). The loss of every micro-batch is divided by the number of
target units (tokens or images) in the whole group, so accumulating k micro-batches gives the
same gradient as one batch k times larger.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import get_scheduler

from lora_scripts.atomic import write_atomically
from lora_scripts.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_errors_explained,
)
from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.faults import fault_due, maybe_kill
from lora_scripts.schedule import StepPlan, shuffled_batches
from lora_scripts.output_dir import check_free_space, check_output_dir, check_resume_compatible, probe_writable
from lora_scripts.tasks import build_task, preflight
from lora_scripts.tasks.base import Progress, Task
from lora_scripts.tracking import Tracker, plot_loss_curve

CONFIG_FILE = "training_config.yaml"


@dataclass
class TrainResult:
    """How a run ended and where its files are."""

    status: str  # "done" or "interrupted"
    step: int
    output_dir: Path
    checkpoint: Path | None


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"{self.signal_name}: finishing this step, then writing a checkpoint (press again to abort)")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume_hint: str = "") -> TrainResult:
    """Train `cfg` to completion (or until SIGINT/SIGTERM) and write the LoRA to `output_dir`."""
    out = cfg.output_dir
    checkpoints = check_output_dir(cfg)
    preflight(cfg)
    probe_writable(out)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    task = build_task(cfg, accelerator.device.type)
    if not task.train_set:
        raise UserError(f"{cfg.train_data_dir}: no training samples")
    world = accelerator.num_processes  # micro-batches are global; each process takes its share
    batcher = task.batcher or shuffled_batches(len(task.train_set), cfg.batch_size * world, cfg.seed)
    plan = StepPlan(batcher, cfg.gradient_accumulation_steps, cfg.epochs, cfg.max_steps)
    params = [p for p in task.model.parameters() if p.requires_grad]
    check_free_space(out, sum(p.numel() * p.element_size() for p in params), cfg.save_total_limit)
    optimizer = torch.optim.AdamW(task.param_groups or params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=plan.total_steps)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    tqdm.write(task.summary)
    tqdm.write(f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), {cfg.gradient_accumulation_steps} micro-batch(es) of {cfg.batch_size} per step")

    step, history = 0, None
    if cfg.resume and checkpoints:
        step, history = _restore(checkpoints[-1], cfg, task, optimizer, scheduler, accelerator)
        tqdm.write(f"resumed from {checkpoints[-1]} at step {step}")
    elif cfg.resume:
        tqdm.write(f"resume: no checkpoint in {out} yet, starting from step 0")

    tracker = Tracker(out / "logs", history, enabled=accelerator.is_main_process)
    last_saved: Path | None = checkpoints[-1] if checkpoints else None

    def save(at_step: int) -> Path:
        meta = {"step": at_step, "config": cfg.model_dump(mode="json"), "fingerprint": task.fingerprint, "history": tracker.history}
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng_state(),
        }
        folder = out / f"step_{at_step}"
        if accelerator.is_main_process:
            name = f"{cfg.effective_output_name}_step_{at_step}"
            progress = Progress(at_step, plan.total_steps, plan.steps_per_epoch)
            folder = save_checkpoint(out, at_step, lambda d: task.save_adapter(d, name, progress), task.trainable_state(), state, meta, cfg.save_total_limit)
        accelerator.wait_for_everyone()
        return folder

    window = {"loss": 0.0, "units": 0, "processed": 0, "busy": 0.0, "skipped": 0}  # "busy": seconds in steps
    status, split = "done", 1
    model.train()
    with StopRequest() as stop, tqdm(total=plan.total_steps, initial=step, disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        while step < plan.total_steps:
            step += 1
            shard = [idx[accelerator.process_index :: world] for idx in plan.micro_batches(step - 1)]
            started = time.perf_counter()
            loss, units, grad_norm, processed, split = _step_with_retry(model, task, shard, params, optimizer, accelerator, cfg, step, split)
            window["busy"] += time.perf_counter() - started
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                if cfg.nan_policy == "stop":
                    where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                    raise UserError(f"step {step}: loss/gradient is not finite (loss={loss:.4g}, grad_norm={grad_norm:.4g}); stopped before the update reached the weights{where}. Cause: {task.nan_advice}; or set nan_policy: skip")
                window["skipped"] += 1
            else:
                window["loss"] += loss * units
                window["units"] += units
            scheduler.step()
            if task.after_step is not None:
                task.after_step(Progress(step, plan.total_steps, plan.steps_per_epoch))
            window["processed"] += processed
            bar.update(1)
            maybe_kill("kill_after_step", step)
            if step % cfg.logging_steps == 0 or step == plan.total_steps:
                _log_window(window, tracker, bar, step, scheduler.get_last_lr()[0], grad_norm, task.unit_name)
            due_save = cfg.save_steps and step % cfg.save_steps == 0
            due_eval = (cfg.eval_steps and step % cfg.eval_steps == 0) or (due_save and not cfg.eval_steps)
            if task.eval_set and (due_eval or step == plan.total_steps):
                tracker.log(step, {"eval_loss": evaluate(model, task, cfg.batch_size)})
            if due_save or step == plan.total_steps:
                last_saved = save(step)
            if stop.signal_name and step < plan.total_steps:
                last_saved = save(step)
                status = "interrupted"
                tqdm.write(f"stopped by {stop.signal_name} at step {step}; checkpoint {last_saved}. Resume with: {resume_hint}")
                break
    tracker.close()
    if status == "done" and accelerator.is_main_process:
        _write_final(cfg, task, tracker.history, Progress(step, plan.total_steps, plan.steps_per_epoch))
    return TrainResult(status, step, out, last_saved)


def _restore(checkpoint: Path, cfg: TrainConfig, task: Task, optimizer, scheduler, accelerator: Accelerator) -> tuple[int, dict]:
    """Load a checkpoint's LoRA weights, optimizer, scheduler, scaler and RNG; return (step, history)."""
    meta, saved_params, state = load_checkpoint(checkpoint)
    check_resume_compatible(meta, cfg, task.fingerprint)
    with torch.no_grad():
        for name, param in task.model.named_parameters():
            if param.requires_grad:
                param.copy_(saved_params[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return meta["step"], meta["history"]


def backward_group(model, task: Task, batches: list, accelerator: Accelerator, step: int = 0) -> tuple[float, int]:
    """Forward/backward over one accumulation group with the loss normalised by the group's units.

    Returns (loss per unit, units). The gradients equal those of one batch holding the whole
    group. `step` only names the step for fault injection (`faults.py`).
    """
    poison = fault_due("nan_loss", step)
    units = sum(task.count_units(b) for b in batches)
    global_units = int(accelerator.reduce(torch.tensor(units, device=accelerator.device), "sum").item())
    scale = accelerator.num_processes / max(global_units, 1)  # DDP averages gradients over processes
    loss_total = 0.0
    for index, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = nullcontext() if index == len(batches) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = task.loss(model, batch) * (math.nan if poison else 1.0)
        accelerator.backward(loss * scale)
        loss_total += loss.item()
        if index == 0 and len(batches) > 1:
            maybe_kill("kill_mid_accumulation", step)
    return loss_total / max(units, 1), units


def _step_with_retry(model, task: Task, micro_batches: list[list[int]], params, optimizer, accelerator: Accelerator,
                     cfg: TrainConfig, step: int, split: int) -> tuple[float, int, float, int, int]:
    """One optimizer step over `micro_batches`, each cut in `split` parts.

    On out-of-memory with `auto_batch_size`, retries with the parts halved: the loss is normalised
    over the whole group, so the update stays the same. Returns (loss, units, grad norm,
    processed, split).
    """
    while True:
        rng = rng_state() if cfg.auto_batch_size else None
        parts = [idx[i : i + math.ceil(len(idx) / split)] for idx in micro_batches for i in range(0, len(idx), math.ceil(len(idx) / split))]
        batches = [task.collate([task.train_set[i] for i in part]) for part in parts]
        try:
            if fault_due("oom", step):
                raise torch.OutOfMemoryError("injected out-of-memory (LORA_SCRIPTS_FAULT)")
            loss, units = backward_group(model, task, batches, accelerator, step)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            largest = max(len(p) for p in parts)
            if not cfg.auto_batch_size or largest <= 1:
                raise UserError(
                    f"out of memory at step {step} with micro-batches of {largest}; in order: lower batch_size "
                    f"(and raise gradient_accumulation_steps to keep the effective batch), lower resolution or "
                    f"max_seq_length, lower lora_rank, enable gradient_checkpointing; or set auto_batch_size: true"
                ) from None
            split *= 2
            set_rng_state(rng)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write(f"out of memory at step {step}: retrying with micro-batches of {math.ceil(largest / 2)} ({split}x accumulation)")
            continue
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
        if cfg.mixed_precision == "fp16" and not math.isfinite(grad_norm):
            grad_norm = 0.0  # the gradient scaler skips this step and lowers its scale by itself
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, units, grad_norm, sum(task.count_processed(b) for b in batches), split


def evaluate(model, task: Task, batch_size: int) -> float:
    """Mean loss per unit over the validation set."""
    model.eval()
    total, units = 0.0, 0
    device = next(p for p in model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(task.eval_set), batch_size):
            batch = task.collate(list(task.eval_set[start : start + batch_size]))
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(task.loss(model, batch))
            units += task.count_units(batch)
    model.train()
    return total / max(units, 1)


def _log_window(window: dict, tracker: Tracker, bar: tqdm, step: int, lr: float, grad_norm: float, unit_name: str) -> None:
    scalars = {"lr": lr, "grad_norm": grad_norm, f"{unit_name}_per_sec": window["processed"] / max(window["busy"], 1e-9)}
    if window["units"]:
        scalars["loss"] = window["loss"] / window["units"]
    if window["skipped"]:
        scalars["skipped_steps"] = window["skipped"]
    tracker.log(step, scalars)
    bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", **{f"{unit_name}/s": f"{scalars[f'{unit_name}_per_sec']:.0f}"})
    window.update(loss=0.0, units=0, processed=0, busy=0.0, skipped=0)


def _write_final(cfg: TrainConfig, task: Task, history: dict, progress: Progress) -> None:
    """The finished LoRA in `output_dir`, with the resolved config and the loss curve."""
    out = cfg.output_dir

    def write(tmp: Path) -> None:
        task.save_adapter(tmp, cfg.effective_output_name, progress)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")

    with write_errors_explained(out / CONFIG_FILE, out):
        write_atomically(out, write)
    plot_loss_curve(history, out / "loss_curve.png")
