"""Several processes or machines: the launcher that starts the ranks (parent side) and what a
rank needs to take part in the job (rank side).

`lora-scripts train --config x.yaml --num-processes N` starts N copies of the same command, one
per rank, each with torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun does; accelerate reads it and joins the
process group: NCCL on GPUs, gloo on CPUs. (`accelerate launch --cpu` would start one process
unless mpirun is installed, so the CPU case cannot go through it.) `accelerate launch -m
lora_scripts train …` and torchrun set the same variables, and such a rank trains directly.

The launcher watches its ranks: the first that fails ends the job (the others are killed, since
they would wait for it until the collectives time out) and its error line is printed as
`rank K failed: …`. SIGINT/SIGTERM are passed on to every rank, which then finish the step they
are in, agree on it, write one checkpoint and stop. Each rank runs in its own process group (a
terminal's Ctrl-C reaches only the launcher, which passes it on once) and dies with the launcher
(PR_SET_PDEATHSIG), so killing the launcher kills the job.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from lora_scripts.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lora_scripts.config import TrainConfig

T = TypeVar("T")
LAUNCH_FLAGS_ENV = "LORA_SCRIPTS_LAUNCH_FLAGS"  # the launcher's flags, for the resume hint a rank prints
DEFAULT_PORT = 29500  # accelerate's and torchrun's default main_process_port
LOST_CONTACT = "error: lost contact with the other processes"  # a rank that saw another fail (lost_contact)
TAIL_BYTES = 16_384  # how much of each rank's stderr is kept to find its error line
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Topology:
    """Where the ranks run, in accelerate's terms: `num_processes` counts every machine's."""

    num_processes: int
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int | None = None

    @property
    def per_machine(self) -> int:
        return self.num_processes // self.num_machines

    def flags(self) -> str:
        """The command-line flags that start this topology again (for the resume hint)."""
        text = f" --num-processes {self.num_processes}"
        if self.num_machines > 1:
            text += (f" --num-machines {self.num_machines} --machine-rank {self.machine_rank}"
                     f" --main-process-ip {self.main_process_ip} --main-process-port {self.main_process_port}")
        return text


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s flags for several processes, under accelerate's names (either spelling)."""
    group = parser.add_argument_group("several processes or machines (accelerate's flags)")
    group.add_argument("--num-processes", "--num_processes", type=int, metavar="N",
                       help="processes in all, over every machine (one per GPU; on a CPU-only machine, CPU processes over gloo)")
    group.add_argument("--num-machines", "--num_machines", type=int, metavar="M", help="machines taking part (default 1)")
    group.add_argument("--machine-rank", "--machine_rank", type=int, metavar="R", help="this machine's number, 0 to M-1 (0 is the main one)")
    group.add_argument("--main-process-ip", "--main_process_ip", metavar="IP", help="address of machine 0, reachable from every machine")
    group.add_argument("--main-process-port", "--main_process_port", type=int, metavar="PORT",
                       help=f"port on machine 0 (default {DEFAULT_PORT} with several machines, a free one on one machine)")


LAUNCH_KEYS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def plan_launch(args: argparse.Namespace, cfg: TrainConfig) -> Topology | None:
    """The ranks to start for `args` and the config's accelerate config file, or None to train in
    this process (one process, or this process already is a rank)."""
    given = {key: getattr(args, key) for key in LAUNCH_KEYS if getattr(args, key, None) is not None}
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UserError(f"{flag}: this process already is rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} "
                            "(started by accelerate launch or torchrun); give the processes to that launcher only")
        return None
    values = {**_accelerate_file_values(cfg), **given}
    topology = Topology(**{"num_processes": 1, **values})
    if topology.num_processes < 1 or topology.num_machines < 1:
        raise UserError("--num-processes and --num-machines must be at least 1")
    if topology.num_processes % topology.num_machines:
        raise UserError(f"--num-processes {topology.num_processes} counts every machine's processes; it must be a multiple of --num-machines {topology.num_machines}")
    if not 0 <= topology.machine_rank < topology.num_machines:
        raise UserError(f"--machine-rank {topology.machine_rank}: must be 0 to {topology.num_machines - 1} (one number per machine, 0 for the main one)")
    if topology.num_machines > 1:
        if "main_process_ip" not in values:
            raise UserError("--main-process-ip: with several machines give machine 0's address, reachable from every machine (the same on each)")
        return Topology(**{**values, "num_processes": topology.num_processes, "main_process_port": topology.main_process_port or DEFAULT_PORT})
    return topology if topology.num_processes > 1 else None


def _accelerate_file_values(cfg: TrainConfig) -> dict[str, Any]:
    """The launch keys an accelerate config file (`distributed.accelerate_config`) sets."""
    path = cfg.distributed.accelerate_config
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"distributed.accelerate_config {path}: file not found (`accelerate config --config_file {path}` writes one)")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        loaded = load_config_from_file(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"distributed.accelerate_config {path}: not an accelerate config file ({str(exc).splitlines()[0]})") from None
    return {key: getattr(loaded, key) for key in LAUNCH_KEYS if getattr(loaded, key, None) is not None}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Parent side: start, watch, pass signals on


@dataclass
class Rank:
    """One started rank: its process and the tail of its stderr."""

    index: int
    proc: subprocess.Popen
    tail: bytes = b""
    reader: threading.Thread | None = None


def launch(topology: Topology, command: list[str]) -> int:
    """Run `lora-scripts COMMAND` as this machine's ranks of `topology`; returns the exit code
    (0 when every rank succeeded; else the failed rank's, after printing its error line)."""
    port = topology.main_process_port or free_port()
    first = topology.machine_rank * topology.per_machine
    base_env = {**os.environ, "WORLD_SIZE": str(topology.num_processes), "LOCAL_WORLD_SIZE": str(topology.per_machine),
                "MASTER_ADDR": topology.main_process_ip, "MASTER_PORT": str(port), "GROUP_RANK": str(topology.machine_rank),
                LAUNCH_FLAGS_ENV: topology.flags()}
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the machine's cores shared by its ranks
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // topology.per_machine))
    ranks = []
    try:
        for local in range(topology.per_machine):
            env = {**base_env, "RANK": str(first + local), "LOCAL_RANK": str(local)}
            proc = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", *command], env=env, stdin=subprocess.DEVNULL,
                                    stdout=None if local == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    process_group=0, preexec_fn=_die_with_parent(os.getpid()))
            ranks.append(Rank(first + local, proc))
    except OSError as exc:
        _kill(ranks)
        raise UserError(f"cannot start rank {first + len(ranks)}: {exc}") from None
    for rank in ranks:  # readers start after every fork (preexec_fn and threads do not mix)
        rank.reader = threading.Thread(target=_pump, args=(rank, rank.index == first), daemon=True)
        rank.reader.start()
    where = f" (machine {topology.machine_rank} of {topology.num_machines})" if topology.num_machines > 1 else ""
    print(f"launched ranks {first}-{first + len(ranks) - 1} of {topology.num_processes}{where}, main process {topology.main_process_ip}:{port}", flush=True)
    with _PassSignalsOn(ranks):
        failed = _watch(ranks)
    for rank in ranks:
        rank.reader.join(timeout=10)
    if not failed:
        return 0
    # Ranks failing in the same poll are usually one cause seen twice (an error the main process
    # passed on, or a peer noticing the dead one): report the cause, else the lowest rank.
    lines = {rank.index: error_line(rank.tail.decode("utf-8", "replace"), rank.proc.returncode) for rank in failed}
    cause = min(failed, key=lambda rank: (lines[rank.index].startswith(LOST_CONTACT), rank.index))
    new_line = "\n" if ranks[0].tail and not ranks[0].tail.endswith(b"\n") else ""  # after a progress bar cut mid-line
    print(f"{new_line}rank {cause.index} failed: {lines[cause.index]}", file=sys.stderr, flush=True)
    code = cause.proc.returncode
    return code if code > 0 else 128 - code


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the launcher dies (Linux; elsewhere nothing)."""

    def arm() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (AttributeError, OSError):
            return
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return arm


def _pump(rank: Rank, raw: bool) -> None:
    """Copy a rank's stderr to ours as it comes (other ranks' lines prefixed) and keep its tail."""
    fd, pending = rank.proc.stderr.fileno(), b""
    while chunk := os.read(fd, 65536):
        rank.tail = (rank.tail + chunk)[-TAIL_BYTES:]
        if raw:  # the progress bar redraws with \r: pass it through unbuffered
            sys.stderr.buffer.write(chunk)
        else:
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            sys.stderr.buffer.write(b"".join(f"[rank {rank.index}] ".encode() + line + b"\n" for line in lines))
        sys.stderr.buffer.flush()
    if pending and not raw:
        sys.stderr.buffer.write(f"[rank {rank.index}] ".encode() + pending + b"\n")
        sys.stderr.buffer.flush()


def _watch(ranks: list[Rank]) -> list[Rank]:
    """Wait until every rank has exited ([]) or some failed (those; the others are killed, as
    they would wait for the failed ones until the collectives time out)."""
    while True:
        codes = [rank.proc.poll() for rank in ranks]
        failed = [rank for rank, code in zip(ranks, codes) if code not in (None, 0)]
        if failed:
            _kill(ranks)
            return failed
        if all(code == 0 for code in codes):
            return []
        time.sleep(0.05)


def _kill(ranks: list[Rank]) -> None:
    for rank in ranks:
        if rank.proc.poll() is None:
            rank.proc.kill()
    for rank in ranks:
        rank.proc.wait()


class _PassSignalsOn:
    """While active, SIGINT/SIGTERM to the launcher are sent on to every running rank."""

    def __init__(self, ranks: list[Rank]) -> None:
        self.ranks = ranks
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _PassSignalsOn:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def _forward(self, signum: int, frame: object) -> None:
        for rank in self.ranks:
            if rank.proc.poll() is None:
                rank.proc.send_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def error_line(stderr: str, returncode: int) -> str:
    """What a failed rank's stderr says went wrong: its `error:` line, else the exception line of
    its traceback; or the signal that killed it."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line) or line == "interrupted":
            return line
    return lines[-1] if lines else f"exit code {returncode}"


# ---------------------------------------------------------------------------------------
# Rank side


def process_rank() -> int:
    """This process's rank in the job (0 when alone), from the launcher's environment."""
    return int(os.environ.get("RANK", "0"))


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator of this process with the config's strategy and collectives timeout; joins
    the job's process group when started as a rank. Refuses what cannot run here."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    strategy, on_cpu = cfg.distributed.strategy, not torch.cuda.is_available()
    if strategy == "deepspeed":
        import importlib.util

        installed = importlib.util.find_spec("deepspeed") is not None
        raise UserError("distributed.strategy: deepspeed " + (
            "is installed, but this loop does not drive its engine (DeepSpeed takes over accumulation, clipping and "
            "checkpoints, which exact resume needs)" if installed else "is not installed (pip install deepspeed; CUDA GPUs only), "
            "and this loop does not drive its engine yet") + "; use strategy: fsdp to shard a large base model, or ddp")
    plugins = {}
    if strategy == "fsdp":
        if on_cpu:
            raise UserError("distributed.strategy: fsdp shards the model over GPUs, and accelerate runs FSDP on GPUs only (on CPUs it would fall back to DDP); use strategy: ddp here")
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                                reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=on_cpu, kwargs_handlers=[timeout], **plugins)


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def computed_once(compute: Callable[[], T]) -> T:
    """`compute()` on the main process only; the others wait and receive its result (or raise
    its UserError), so a cache is built once and files are read and written by one process."""
    import torch.distributed as dist

    if world_size() == 1:
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("result", compute())]
        except UserError as exc:
            dist.broadcast_object_list([("error", str(exc))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def lost_contact(exc: BaseException, cfg: TrainConfig) -> UserError | None:
    """A collective that failed because another process died or stalled, as one error line."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not re.search(r"(?i)timed? ?out|connection (closed|reset|refused)|broken pipe|peer", text):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [type(exc).__name__])[0])[:160]  # gloo's [file:line]
    return UserError(f"{LOST_CONTACT.removeprefix('error: ')} ({first}); one of them failed or stalled (see its error), "
                     f"or did not answer within distributed.timeout_minutes = {cfg.distributed.timeout_minutes:g}")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; the
    processes of a job agree on that step (`agreed`), so they save the same checkpoint."""

    def __init__(self, announce: bool = True) -> None:
        self.signal_name: str | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            from tqdm import tqdm

            tqdm.write(f"{self.signal_name}: finishing this step, then writing a checkpoint (press again to abort)")

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: all stop after the same step."""
        return sum_over_processes(accelerator, float(self.signal_name is not None)) > 0

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def sum_over_processes(accelerator: Accelerator, value: float) -> float:
    """`value` summed over every process (itself with one)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=accelerator.device), "sum").item())


def end_process_group() -> None:
    """Leave the job's process group (a process exiting inside one aborts instead of exiting).

    Gloo's worker threads may still be releasing the last collective's tensors, which takes the
    GIL; the group's destructor joins those threads while holding the GIL (when DDP lets go of
    it), so it would wait forever. A short sleep gives the GIL up while they finish.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()
