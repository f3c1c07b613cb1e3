"""The training loop shared by every task: setup → steps → save → finish, each one function.

One optimizer step consumes `gradient_accumulation_steps` micro-batches, taken in a seeded
per-epoch order (`schedule.py`). The loss of every micro-batch is divided by the number of
target units (tokens or images) in the whole group, so accumulating k micro-batches gives the
same gradient as one batch k times larger.

Several processes (`launch.py`) share each micro-batch (`schedule.process_share`): the units are
summed over processes, so the gradient is the whole global group's and the result is one
process's with the whole batch, up to float summation order. Only the main process writes
files (checkpoints, logs, samples, the final LoRA, exports); the others wait for it and receive
its errors. Every process restores its own RNG state on resume.
"""

from __future__ import annotations

import math
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
    all_rng_states,
    full_parameters,
    load_checkpoint,
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_errors_explained,
)
from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.faults import fault_due, maybe_kill
from lora_scripts.launch import StopRequest, computed_once, end_process_group, lost_contact, make_accelerator, sum_over_processes, world_size
from lora_scripts.models.lora_delta import fuse_lora_layers
from lora_scripts.schedule import StepPlan, global_batch_size, process_share, sample_seeds, shuffled_batches
from lora_scripts.output_dir import check_free_space, check_output_dir, check_resume_compatible, probe_writable
from lora_scripts.tasks import get_task
from lora_scripts.tasks.base import Progress, Task, TaskRun
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
    task_type: Task
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


def train(cfg: TrainConfig, resume_hint: str = "") -> TrainResult:
    """Train `cfg` to completion (or until SIGINT/SIGTERM) and write the LoRA to `output_dir`."""
    try:
        run = setup(cfg)
        status = run_steps(run, resume_hint)
        finish(run, status)
    except RuntimeError as exc:  # a collective failed: another process died or stalled
        if world_size() == 1 or (error := lost_contact(exc, cfg)) is None:
            raise
        raise error from exc
    finally:
        end_process_group()
    return TrainResult(status, run.step, cfg.output_dir, run.last_saved)


def setup(cfg: TrainConfig) -> Run:
    """Check inputs and output folder, build the task, optimizer and schedule; restore on resume."""
    out = cfg.output_dir
    task_type = get_task(cfg.task_type)
    accelerator = make_accelerator(cfg)  # with several processes: joins the others here
    world, say = accelerator.num_processes, _say(accelerator)
    if cfg.auto_batch_size and world > 1:
        raise UserError(f"auto_batch_size retries an out-of-memory step on one process only; with {world} processes set batch_size yourself")
    checkpoints = computed_once(lambda: _check_inputs(cfg, task_type))
    set_seed(cfg.seed)
    task = task_type.build(cfg, accelerator.device.type)
    if not task.train_set:
        raise UserError(f"{cfg.train_data_dir}: no training samples")
    batcher = task.batcher or shuffled_batches(len(task.train_set), global_batch_size(cfg.batch_size), cfg.seed)
    plan = StepPlan(batcher, cfg.gradient_accumulation_steps, cfg.epochs, cfg.max_steps)
    sharded = cfg.distributed.strategy == "fsdp"
    if cfg.fused_lora and not sharded:  # FSDP re-gathers weights that a fused layer would hold
        fuse_lora_layers(task.model)
    params = [p for p in task.model.parameters() if p.requires_grad]
    computed_once(lambda: check_free_space(out, sum(p.numel() * p.element_size() for p in params), cfg.save_total_limit))
    # AdamW's fused kernel: the same update in one pass over all LoRA weights (FSDP's sharded weights excluded)
    fused = accelerator.device.type in ("cpu", "cuda") and not sharded and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(task.param_groups or params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=plan.total_steps)
    if sharded and not getattr(task.model, "_no_split_modules", None):
        raise UserError("distributed.strategy: fsdp shards the model block by block, and this model names no blocks (`_no_split_modules`); use strategy: ddp")
    model, optimizer = accelerator.prepare(task.model, optimizer)  # DDP starts every process from the main one's weights
    if world > 1:  # each process its own random stream (dropout, augmentations); per-sample draws use sample_seeds
        set_seed(cfg.seed, device_specific=True)
    say(task.summary)
    per_step = f"{cfg.gradient_accumulation_steps} micro-batch(es) of {cfg.batch_size} per step"
    if world > 1:
        per_step = (f"{cfg.gradient_accumulation_steps} micro-batch(es) of {cfg.batch_size} per process x {world} processes: "
                    f"global batch {cfg.batch_size * world * cfg.gradient_accumulation_steps} per step")
    say(f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), {per_step}")

    step, history = 0, None
    if cfg.resume and checkpoints:
        step, history = _restore(checkpoints[-1], cfg, task, optimizer, scheduler, accelerator)
        say(f"resumed from {checkpoints[-1]} at step {step}")
    elif cfg.resume:
        say(f"resume: no checkpoint in {out} yet, starting from step 0")
    tracker = Tracker(out / "logs", history, enabled=accelerator.is_main_process)
    return Run(cfg, task_type, accelerator, task, model, params, optimizer, scheduler, plan, tracker, step, checkpoints[-1] if checkpoints else None)


def _check_inputs(cfg: TrainConfig, task_type: Task) -> list[Path]:
    """The main process's checks before any weights load; returns output_dir's checkpoints."""
    checkpoints = check_output_dir(cfg)
    unknown = [name for name in cfg.export if name not in task_type.exports]
    if unknown:
        raise UserError(f"export: {unknown[0]} is not available for {task_type.name} LoRAs; choose from: {', '.join(task_type.exports) or 'none'}")
    task_type.preflight(cfg)
    probe_writable(cfg.output_dir)
    return checkpoints


def _say(accelerator: Accelerator):
    """Print a line on the main process only (tqdm.write keeps the progress bar intact)."""
    return tqdm.write if accelerator.is_main_process else (lambda text: None)


def run_steps(run: Run, resume_hint: str) -> str:
    """The step loop: lr → forward/backward → clip → update → log → eval → save.

    Returns "done", or "interrupted" after a SIGINT/SIGTERM (a checkpoint is written first).
    """
    cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
    window, split, say = LogWindow(), 1, _say(accelerator)
    run.model.train()
    with StopRequest(announce=accelerator.is_main_process) as stop, \
            tqdm(total=plan.total_steps, initial=run.step, disable=not accelerator.is_local_main_process, dynamic_ncols=True) as bar:
        while run.step < plan.total_steps:
            run.step += 1
            step = run.step
            started = time.perf_counter()
            result = _step_with_retry(run, plan.micro_batches(step - 1), split)
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
                run.tracker.log(step, {"eval_loss": evaluate(run.task, cfg.batch_size, accelerator)})
            if due_save or step == plan.total_steps:
                save(run)
            if stop.agreed(accelerator) and step < plan.total_steps:
                if not due_save:
                    save(run)
                say(f"stopped by {stop.signal_name or 'a signal to another process'} at step {step}; checkpoint {run.last_saved}. Resume with: {resume_hint}")
                return "interrupted"
    return "done"


def save(run: Run) -> Path:
    """Write the checkpoint `step_{N}` (main process; the others wait) and remember it."""
    cfg, accelerator, task = run.cfg, run.accelerator, run.task
    meta = {"step": run.step, "config": cfg.model_dump(mode="json"), "fingerprint": task.fingerprint, "history": run.tracker.history}
    name, progress = f"{cfg.effective_output_name}_step_{run.step}", run.progress()
    state = {  # every process takes part in gathering the optimizer state (FSDP) and the RNG states
        "optimizer": optimizer_state(task.model, run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": all_rng_states(),  # one per process, in rank order
    }
    with full_parameters(task.model):
        run.last_saved = computed_once(lambda: save_checkpoint(cfg.output_dir, run.step, lambda d: task.save_adapter(d, name, progress),
                                                               task.trainable_state(), state, meta, cfg.save_total_limit))
    return run.last_saved


def finish(run: Run, status: str) -> None:
    """Close the logs; when done, write the final LoRA, the resolved config, the loss curve and
    the formats the config's `export:` asks for."""
    run.tracker.close()
    if status == "done":
        with full_parameters(run.task.model):
            computed_once(lambda: _write_final_and_exports(run))


def _write_final_and_exports(run: Run) -> None:
    """On the main process: the final LoRA, then each export the config asks for."""
    _write_final(run.cfg, run.task, run.tracker.history, run.progress())
    for name in run.cfg.export:
        try:
            lines = run.task_type.exports[name](run.cfg)
        except UserError as exc:
            raise UserError(f"the LoRA is saved in {run.cfg.output_dir}, but export {name} failed: {exc}") from None
        tqdm.write("\n".join(lines))


def _restore(checkpoint: Path, cfg: TrainConfig, task: TaskRun, optimizer, scheduler, accelerator: Accelerator) -> tuple[int, dict]:
    """Load a checkpoint's LoRA weights, optimizer, scheduler, scaler and this process's RNG;
    return (step, history). The main process reads it; every process gets the same state."""
    world = accelerator.num_processes
    meta, saved_params, state = computed_once(lambda: _read_checkpoint(checkpoint, cfg, task.fingerprint, world))
    load_trainable_state(task.model, saved_params)
    load_optimizer_state(task.model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][accelerator.process_index])
    return meta["step"], meta["history"]


def _read_checkpoint(checkpoint: Path, cfg: TrainConfig, fingerprint: dict[str, str], world: int) -> tuple[dict, dict, dict]:
    """A checkpoint checked against this run: config, data, number of processes and strategy."""
    meta, params, state = load_checkpoint(checkpoint)
    check_resume_compatible(meta, cfg, fingerprint)
    state["rng"] = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one process's, before multi-process runs
    saved = len(state["rng"])
    if saved != world:
        raise UserError(f"cannot resume {cfg.output_dir}: its checkpoints were written by {saved} process(es), this run has {world}; "
                        f"the global batch and data order depend on it: resume with --num-processes {saved}")
    strategy = meta["config"].get("distributed", {}).get("strategy", "ddp")
    if strategy != cfg.distributed.strategy:
        raise UserError(f"cannot resume {cfg.output_dir}: it was trained with distributed.strategy {strategy}, which its optimizer state is saved for; set it back")
    return meta, params, state


def backward_group(model, task: TaskRun, batches: list, accelerator: Accelerator, step: int = 0,
                   weights: list[float] | None = None) -> tuple[float, int]:
    """Forward/backward over one accumulation group with the loss normalised by the group's units.

    Returns (loss per unit, units), both over every process. The gradients equal those of one
    batch holding the whole group. `weights` is 0 for a batch run only to join the collectives
    (default: all 1). `step` only names the step for fault injection (`faults.py`).
    """
    weights = weights or [1.0] * len(batches)
    poison = fault_due("nan_loss", step)
    units = sum_over_processes(accelerator, sum(task.count_units(b) for b, w in zip(batches, weights) if w))
    scale = accelerator.num_processes / max(units, 1)  # DDP averages gradients over processes
    loss_total = 0.0
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = nullcontext() if index == len(batches) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = task.loss(model, batch) * (math.nan if poison else 1.0)
        accelerator.backward(loss * (scale * weight))
        loss_total += loss.item() * weight
        if index == 0 and len(batches) > 1:
            maybe_kill("kill_mid_accumulation", step)
    return sum_over_processes(accelerator, loss_total) / max(units, 1), int(units)


def _step_with_retry(run: Run, micro_batches: list[list[int]], split: int) -> StepResult:
    """One optimizer step over the global `micro_batches`: this process's share of each, cut in
    `split` parts.

    On out-of-memory with `auto_batch_size` (one process), retries with the parts halved: the loss
    is normalised over the whole group, so the update stays the same.
    """
    cfg, task, accelerator, optimizer, step = run.cfg, run.task, run.accelerator, run.optimizer, run.step
    seeds = sample_seeds(cfg.seed, step, micro_batches)
    while True:
        rng = rng_state() if cfg.auto_batch_size else None
        shares = process_share(micro_batches, seeds, accelerator.process_index, accelerator.num_processes, split)
        batches = [task.collate([task.train_set[i] for i in share.indices]) | {"sample_seeds": torch.tensor(share.seeds)} for share in shares]
        try:
            if fault_due("oom", step):
                raise torch.OutOfMemoryError("injected out-of-memory (LORA_SCRIPTS_FAULT)")
            loss, units = backward_group(run.model, task, batches, accelerator, step, [share.weight for share in shares])
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            largest = max(len(share.indices) for share in shares)
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
        processed = sum(task.count_processed(b) for b, share in zip(batches, shares) if share.weight)
        result = StepResult(loss, units, grad_norm, processed, split)
        if result.finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result


def evaluate(task: TaskRun, batch_size: int, accelerator: Accelerator) -> float:
    """Mean loss per unit over the validation set. Each process evaluates every world-th batch,
    all the same number of them (a stand-in batch at weight 0 when out), so FSDP's gathers match."""
    model, rank, world = task.model, accelerator.process_index, accelerator.num_processes
    starts = list(range(0, len(task.eval_set), batch_size))
    total, units = 0.0, 0
    model.eval()
    with torch.no_grad():
        for index in range(rank, math.ceil(len(starts) / world) * world, world):
            start = starts[index] if index < len(starts) else 0
            batch = {k: v.to(accelerator.device) for k, v in task.collate(list(task.eval_set[start : start + batch_size])).items()}
            loss = float(task.loss(model, batch))
            if index < len(starts):
                total, units = total + loss, units + task.count_units(batch)
    model.train()
    return sum_over_processes(accelerator, total) / max(sum_over_processes(accelerator, units), 1)


def _log_window(window: LogWindow, run: Run, bar: tqdm, grad_norm: float) -> None:
    """Log the window's averages and show them on the progress bar."""
    lr, unit_name = run.scheduler.get_last_lr()[0], run.task.unit_name
    window.processed = int(sum_over_processes(run.accelerator, window.processed))  # every process's tokens/images
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
