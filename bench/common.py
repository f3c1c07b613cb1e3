"""What every benchmark shares: step timing taken from outside any trainer, peak memory, this
machine's matmul peak, running each row in a fresh process, and the sections of BENCHMARKS.md.

Timing never edits a trainer: a global optimizer-step hook (`torch.optim.optimizer.
register_optimizer_step_post_hook`) marks the end of every optimizer step, and a global forward
pre-hook (`torch.nn.modules.module.register_module_forward_pre_hook`) on chosen module types
marks when a step's compute begins. The gap between the two is what the trainer spends outside
the model: loading and collating data plus its own bookkeeping.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_FILE = REPO / "BENCHMARKS.md"
RESULT_MARK = "BENCH_RESULT "
BENCHMARKS_HEADER = """# Benchmarks

Every table below is written by a script in `bench/`; each speed or memory figure is a ratio
against a baseline measured in the same run, on the same machine, on the same data. Re-run a
section with the command it names.
"""


class StepClock:
    """Times optimizer steps of any trainer running in this process (use as a context manager).

    `ends`: perf_counter at the end of each optimizer step. `forwards`: perf_counter at each
    forward call of a module of `module_types` (the first compute of a step). `cpu`: this
    process's CPU time (all threads) at each of those moments, by moment: on a shared machine
    CPU seconds are disturbed far less than wall seconds. On CUDA each step end waits for the
    device, so the times are the device's.
    """

    def __init__(self, module_types: tuple[type, ...]) -> None:
        self.module_types = module_types
        self.ends: list[float] = []
        self.forwards: list[float] = []
        self.cpu: dict[float, float] = {}
        self._handles: list[Any] = []

    def _step_done(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu[self.ends[-1]] = time.process_time()

    def _forward(self, module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, self.module_types):
            self.forwards.append(time.perf_counter())
            self.cpu[self.forwards[-1]] = time.process_time()

    def __enter__(self) -> StepClock:
        self._handles = [
            register_optimizer_step_post_hook(self._step_done),
            register_module_forward_pre_hook(self._forward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def first_forward_after(self, moment: float) -> float:
        """The first forward call after `moment`."""
        return self.forwards[bisect.bisect_right(self.forwards, moment)]

    def last_forward_before(self, moment: float) -> float:
        """The last forward call before `moment` (a step's start when a step is one forward)."""
        return self.forwards[bisect.bisect_left(self.forwards, moment) - 1]

    def waiting_share(self, first: int = 1, last: int | None = None) -> float:
        """Share of steps first..last (0-based, default to the end) spent before their compute began."""
        last = len(self.ends) - 1 if last is None else last
        waits = sum(self.first_forward_after(self.ends[k - 1]) - self.ends[k - 1] for k in range(first, last + 1))
        return waits / max(self.ends[last] - self.ends[first - 1], 1e-9)


def wall_time(moment: float) -> float:
    """A perf_counter reading as time.time() (to compare with the time a process was started)."""
    return time.time() - (time.perf_counter() - moment)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mib() -> float | None:
    """Peak CUDA memory allocated by this process, or None without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: str, seconds: float = 0.3) -> tuple[float, str]:
    """The best FLOP/s torch.matmul reaches here on (m, k, n) shapes: 2·m·k·n per product, the
    fastest of repeated runs (the machine may be shared). Returns (FLOP/s, the best shape)."""
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.matmul(a, b)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(4):
                torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            rate = 4 * 2 * m * k * n / (time.perf_counter() - start)
            if rate > best:
                best, best_shape = rate, f"{m}x{k} @ {k}x{n}"
    return best, best_shape


def machine_info() -> dict[str, Any]:
    """CPUs this process may use, CPU model, load average, date, torch version, GPU if any."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpus": len(os.sched_getaffinity(0)), "cpu_model": model, "load": os.getloadavg(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine, as the tables' caption."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    load = ", ".join(f"{x:.2f}" for x in info["load"])
    return f"Machine: {info['cpus']} CPUs (`nproc`), {info['cpu_model']}{gpu}; torch {info['torch']}; load average at start {load}; {info['date']}."


# -- rows in fresh processes ---------------------------------------------------------------


def run_rows(specs: list[dict[str, Any]], isolate: bool, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run each spec in its own fresh Python process (`isolate`: peaks do not mix), or all in
    one process (quick runs). Every spec gets a result; a failed row's result has "error"."""
    groups = [[spec] for spec in specs] if isolate else [specs]
    results = []
    for group in groups:
        results += _run_child(group, env or {})
    return results


def run_groups(groups: list[tuple[Any, list[dict[str, Any]]]], isolate: bool, env: dict[str, str] | None = None) -> list[tuple[Any, list[dict[str, Any]]]]:
    """`run_rows` over the specs of several groups (tables) at once; the results regrouped."""
    results = run_rows([spec for _, specs in groups for spec in specs], isolate, env)
    regrouped, start = [], 0
    for key, specs in groups:
        regrouped.append((key, results[start : start + len(specs)]))
        start += len(specs)
    return regrouped


def _run_child(specs: list[dict[str, Any]], env: dict[str, str]) -> list[dict[str, Any]]:
    names = ", ".join(spec["name"] for spec in specs)
    print(f"  running {names} …", flush=True)
    spawned = time.time()
    payload = json.dumps([{**spec, "spawned_at": spawned} for spec in specs])
    child_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, "-m", "bench.row", payload], cwd=REPO, capture_output=True, text=True, env=child_env)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            found[result["name"]] = result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    results = []
    for spec in specs:
        result = found.get(spec["name"]) or {"name": spec["name"], "error": f"exit {proc.returncode}: {tail}"}
        status = f"failed: {result['error'].splitlines()[-1]}" if "error" in result else "done"
        print(f"  {spec['name']}: {status} ({time.time() - spawned:.0f} s)", flush=True)
        results.append(result)
    return results


# -- reporting -----------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float | None, base: float | None) -> str:
    """`1.93×`, or `–` when either side is missing."""
    if value is None or base is None or base == 0:
        return "–"
    return f"{value / base:.2f}×"


def run_in_workdir(args: Any, prefix: str, run: Callable[[Any, Path, Path | None], int]) -> int:
    """`run(args, workdir, report)` in `args.workdir`, or in a temporary folder removed afterwards;
    the report is `args.report`, else BENCHMARKS.md (none with `--quick`)."""
    report = args.report or (None if args.quick else BENCHMARKS_FILE)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workdir, report)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the Markdown file `path`, leaving the others.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    begin, end = f"<!-- {name}: begin (written by the script; edits are overwritten) -->", f"<!-- {name}: end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else BENCHMARKS_HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
