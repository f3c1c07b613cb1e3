"""The training loop shared by every task: setup → steps → save → finish, each one function.

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
    load_trainable_state,
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
from lora_scripts.tasks import get_task
from lora_scripts.tasks.base import Progress, TaskRun
from lora_scripts.tracking import Tracker, plot_loss_curve

CONFIG_FILE = "training_config.yaml"


@dataclass
class TrainResult:
    """How a run ended and where its files are."""

    status: str  # "done" or "interrupted"
    step: int
    output_dir: Path
    checkpoint: Path | None


@dataclass
class Run:
    """Everything `setup` builds and the loop, `save` and `finish` share."""

    cfg: TrainConfig
    accelerator: Accelerator
    task: TaskRun
    model: torch.nn.Module  # task.model as accelerate prepared it
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: StepPlan
    tracker: Tracker
    step: int = 0
    last_saved: Path | None = None

    def progress(self) -> Progress:
        """Where the run stands, as the task's hooks see it."""
        return Progress(self.step, self.plan.total_steps, self.plan.steps_per_epoch)


@dataclass
class StepResult:
    """One optimizer step: loss per unit, units, gradient norm, what the throughput counts, and
    the micro-batch split in force afterwards (raised by out-of-memory retries)."""

    loss: float
    units: int
    grad_norm: float
    processed: int
    split: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class LogWindow:
    """Running totals between two log lines."""

    loss_sum: float = 0.0
    units: int = 0
    processed: int = 0
    busy_s: float = 0.0  # seconds spent inside steps
    skipped: int = 0

    def add(self, result: StepResult, seconds: float) -> None:
        """Count one step (a skipped one adds no loss)."""
        self.busy_s += seconds
        self.processed += result.processed
        if result.finite:
            self.loss_sum += result.loss * result.units
            self.units += result.units
        else:
            self.skipped += 1

    def scalars(self, lr: float, grad_norm: float, unit_name: str) -> dict[str, float]:
        """What the tracker logs for this window."""
        scalars = {"lr": lr, "grad_norm": grad_norm, f"{unit_name}_per_sec": self.processed / max(self.busy_s, 1e-9)}
        if self.units:
            scalars["loss"] = self.loss_sum / self.units
        if self.skipped:
            scalars["skipped_steps"] = self.skipped
        return scalars


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
    run = setup(cfg)
    status = run_steps(run, resume_hint)
    finish(run, status)
    return TrainResult(status, run.step, cfg.output_dir, run.last_saved)


def setup(cfg: TrainConfig) -> Run:
    """Check inputs and output folder, build the task, optimizer and schedule; restore on resume."""
    out = cfg.output_dir
    checkpoints = check_output_dir(cfg)
    task_type = get_task(cfg.task_type)
    task_type.preflight(cfg)
    probe_writable(out)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    task = task_type.build(cfg, accelerator.device.type)
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
    return Run(cfg, accelerator, task, model, params, optimizer, scheduler, plan, tracker, step, checkpoints[-1] if checkpoints else None)


def run_steps(run: Run, resume_hint: str) -> str:
    """The step loop: lr → forward/backward → clip → update → log → eval → save.

    Returns "done", or "interrupted" after a SIGINT/SIGTERM (a checkpoint is written first).
    """
    cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
    world = accelerator.num_processes
    window, split = LogWindow(), 1
    run.model.train()
    with StopRequest() as stop, tqdm(total=plan.total_steps, initial=run.step, disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        while run.step < plan.total_steps:
            run.step += 1
            step = run.step
            shard = [idx[accelerator.process_index :: world] for idx in plan.micro_batches(step - 1)]
            started = time.perf_counter()
            result = _step_with_retry(run, shard, split)
            split = result.split
            window.add(result, time.perf_counter() - started)
            if not result.finite and cfg.nan_policy == "stop":
                where = f"; the last good checkpoint is {run.last_saved}" if run.last_saved else ""
                raise UserError(f"step {step}: loss/gradient is not finite (loss={result.loss:.4g}, grad_norm={result.grad_norm:.4g}); stopped before the update reached the weights{where}. Cause: {run.task.nan_advice}; or set nan_policy: skip")
            run.scheduler.step()
            if run.task.after_step is not None and accelerator.is_main_process:
                run.task.after_step(run.progress(), run.tracker)
            bar.update(1)
            maybe_kill("kill_after_step", step)
            if step % cfg.logging_steps == 0 or step == plan.total_steps:
                _log_window(window, run, bar, result.grad_norm)
                window = LogWindow()
            due_save = cfg.save_steps and step % cfg.save_steps == 0
            due_eval = (cfg.eval_steps and step % cfg.eval_steps == 0) or (due_save and not cfg.eval_steps)
            if run.task.eval_set and (due_eval or step == plan.total_steps):
                run.tracker.log(step, {"eval_loss": evaluate(run.model, run.task, cfg.batch_size)})
            if due_save or step == plan.total_steps:
                save(run)
            if stop.signal_name and step < plan.total_steps:
                save(run)
                tqdm.write(f"stopped by {stop.signal_name} at step {step}; checkpoint {run.last_saved}. Resume with: {resume_hint}")
                return "interrupted"
    return "done"


def save(run: Run) -> Path:
    """Write the checkpoint `step_{N}` (main process; the others wait) and remember it."""
    cfg, accelerator = run.cfg, run.accelerator
    meta = {"step": run.step, "config": cfg.model_dump(mode="json"), "fingerprint": run.task.fingerprint, "history": run.tracker.history}
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_state(),
    }
    folder = cfg.output_dir / f"step_{run.step}"
    if accelerator.is_main_process:
        name, progress = f"{cfg.effective_output_name}_step_{run.step}", run.progress()
        folder = save_checkpoint(cfg.output_dir, run.step, lambda d: run.task.save_adapter(d, name, progress),
                                 run.task.trainable_state(), state, meta, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    run.last_saved = folder
    return folder


def finish(run: Run, status: str) -> None:
    """Close the logs; when done, write the final LoRA, the resolved config and the loss curve."""
    run.tracker.close()
    if status == "done" and run.accelerator.is_main_process:
        _write_final(run.cfg, run.task, run.tracker.history, run.progress())


def _restore(checkpoint: Path, cfg: TrainConfig, task: TaskRun, optimizer, scheduler, accelerator: Accelerator) -> tuple[int, dict]:
    """Load a checkpoint's LoRA weights, optimizer, scheduler, scaler and RNG; return (step, history)."""
    meta, saved_params, state = load_checkpoint(checkpoint)
    check_resume_compatible(meta, cfg, task.fingerprint)
    load_trainable_state(task.model, saved_params)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return meta["step"], meta["history"]


def backward_group(model, task: TaskRun, batches: list, accelerator: Accelerator, step: int = 0) -> tuple[float, int]:
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


def _step_with_retry(run: Run, micro_batches: list[list[int]], split: int) -> StepResult:
    """One optimizer step over `micro_batches`, each cut in `split` parts.

    On out-of-memory with `auto_batch_size`, retries with the parts halved: the loss is normalised
    over the whole group, so the update stays the same.
    """
    cfg, task, accelerator, optimizer, step = run.cfg, run.task, run.accelerator, run.optimizer, run.step
    while True:
        rng = rng_state() if cfg.auto_batch_size else None
        parts = [idx[i : i + math.ceil(len(idx) / split)] for idx in micro_batches for i in range(0, len(idx), math.ceil(len(idx) / split))]
        batches = [task.collate([task.train_set[i] for i in part]) for part in parts]
        try:
            if fault_due("oom", step):
                raise torch.OutOfMemoryError("injected out-of-memory (LORA_SCRIPTS_FAULT)")
            loss, units = backward_group(run.model, task, batches, accelerator, step)
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
        grad_norm = float(accelerator.clip_grad_norm_(run.params, max_norm))
        if cfg.mixed_precision == "fp16" and not math.isfinite(grad_norm):
            grad_norm = 0.0  # the gradient scaler skips this step and lowers its scale by itself
        result = StepResult(loss, units, grad_norm, sum(task.count_processed(b) for b in batches), split)
        if result.finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result


def evaluate(model, task: TaskRun, batch_size: int) -> float:
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


def _log_window(window: LogWindow, run: Run, bar: tqdm, grad_norm: float) -> None:
    """Log the window's averages and show them on the progress bar."""
    lr, unit_name = run.scheduler.get_last_lr()[0], run.task.unit_name
    scalars = window.scalars(lr, grad_norm, unit_name)
    run.tracker.log(run.step, scalars)
    bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", **{f"{unit_name}/s": f"{scalars[f'{unit_name}_per_sec']:.0f}"})


def _write_final(cfg: TrainConfig, task: TaskRun, history: dict, progress: Progress) -> None:
    """The finished LoRA in `output_dir`, with the resolved config and the loss curve."""
    out = cfg.output_dir

    def write(tmp: Path) -> None:
        task.save_adapter(tmp, cfg.effective_output_name, progress)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")

    with write_errors_explained(out / CONFIG_FILE, out):
        write_atomically(out, write)
    plot_loss_curve(history, out / "loss_curve.png")
