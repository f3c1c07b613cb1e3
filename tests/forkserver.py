"""Run `lora-scripts` command lines as forked copies of one warmed-up process.

A cold CLI start spends ~4 s of CPU importing torch, transformers and peft before it does
anything; the bad-input corpus and the crash tests start the CLI dozens of times. The server
imports the CLI and the task modules once, then forks one child per job: its own process with
its own exit code, signals, environment and stdout/stderr files, running
`lora_scripts.cli.main(argv)` as `python -m lora_scripts.cli` would.

Protocol (server side, `python -m tests.forkserver MODULE...`): each stdin line is a JSON
object {"jobs": [...], "parallel": N}; each job is {"argv", "cwd", "env", "stdout", "stderr"}.
The server answers one line: a JSON list of {"returncode", "seconds"} in job order.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Finished:
    """A finished job, shaped like subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


class ForkServer:
    """Client: starts the server with `preload` modules imported, runs jobs in forked children."""

    def __init__(self, preload: list[str], workdir: Path) -> None:
        self.workdir = workdir
        self._count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", *preload], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        )

    def run_many(self, argvs: list[list[str]], env: dict[str, str] | None = None, parallel: int = 1) -> list[Finished]:
        """Run `lora-scripts ARGV` for each argv, `parallel` at a time; results in order."""
        jobs = []
        for argv in argvs:
            self._count += 1
            stem = self.workdir / f"job{self._count}"
            jobs.append({"argv": argv, "cwd": str(REPO), "env": env or {}, "stdout": f"{stem}.out", "stderr": f"{stem}.err"})
        self.proc.stdin.write(json.dumps({"jobs": jobs, "parallel": parallel}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return [Finished(r["returncode"], Path(j["stdout"]).read_text(encoding="utf-8"), Path(j["stderr"]).read_text(encoding="utf-8"), r["seconds"])
                for j, r in zip(jobs, json.loads(line))]

    def run(self, *argv: str, env: dict[str, str] | None = None) -> Finished:
        """Run one `lora-scripts ARGV`."""
        return self.run_many([list(argv)], env)[0]

    def train_ok(self, config, *overrides: str, fault: str = "") -> Finished:
        """`lora-scripts train --config CONFIG --set …` that must succeed, or with `fault` (a
        `LORA_SCRIPTS_FAULT` spec that kills the run) must die of SIGKILL."""
        args = [arg for item in overrides for arg in ("--set", item)]
        proc = self.run("train", "--config", str(config), *args, env={"LORA_SCRIPTS_FAULT": fault})
        assert proc.returncode == (-9 if fault else 0), proc.stderr[-3000:]
        return proc

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _child(job: dict) -> int:
    """In the forked child: environment and stdout/stderr of the job, then the CLI."""
    from lora_scripts.cli import main

    os.environ.update(job["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(job["cwd"])
    try:
        code = main(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve(jobs: list[dict], parallel: int) -> list[dict]:
    """Fork a child per job, at most `parallel` at a time; results in job order."""
    results: list[dict] = [{} for _ in jobs]
    running: dict[int, tuple[int, float]] = {}
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            index, job = pending.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(_child(job))
            running[pid] = (index, time.perf_counter())
        pid, status = os.wait()
        index, start = running.pop(pid)
        results[index] = {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}
    return results


if __name__ == "__main__":
    for module in ["lora_scripts.cli", "lora_scripts.loop", *sys.argv[1:]]:
        importlib.import_module(module)
    for request in sys.stdin:
        batch = json.loads(request)
        print(json.dumps(serve(batch["jobs"], batch["parallel"])), flush=True)
