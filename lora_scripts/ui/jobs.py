"""Run queued jobs as separate processes, N at a time, and learn how each ended.

A job is `python -m lora_scripts.ui.wrapper JOB_DIR -- python -m lora_scripts.cli ARGS`,
started in a session of its own with its output appended to `JOB_DIR/log.txt`, so it neither
needs nor notices the UI. The wrapper writes `JOB_DIR/exit_code` at the end. A train job that
exited 0 is done when its output_dir holds the final `training_config.yaml` (written last by the
loop), and stopped (resumable) otherwise: the trainer exits 0 after a graceful stop too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from lora_scripts.errors import UserError
from lora_scripts.ui import live
from lora_scripts.ui.store import ACTIVE, DONE, FAILED, QUEUED, RUNNING, STOPPED, STOPPING, Job, JobStore
from lora_scripts.ui.wrapper import EXIT_CODE_FILE

LOG_FILE = "log.txt"
CONFIG_FILE = "config.yaml"
TICK_SECONDS = 0.5
RESUME_ARGS = ["--set", "resume=true"]


class JobRunner:
    """Starts, watches and stops the jobs of a `JobStore`; `tick()` does one round of work."""

    def __init__(self, store: JobStore, env: dict[str, str] | None = None) -> None:
        self.store = store
        self.env = env
        self._children: dict[int, subprocess.Popen] = {}  # processes this UI started (reaped here)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def max_parallel(self) -> int:
        """How many jobs may run at once (a setting kept in SQLite)."""
        return int(self.store.setting("max_parallel", "1"))

    def set_max_parallel(self, value: int) -> None:
        """Change the number of jobs run at once (1..64)."""
        if not 1 <= value <= 64:
            raise UserError(f"max_parallel {value}: choose a number from 1 to 64")
        self.store.set_setting("max_parallel", str(value))

    # -- the scheduler ---------------------------------------------------------------------

    def start_background(self) -> None:
        """Run `tick()` every half second in a daemon thread until `shutdown()`."""
        self._thread = threading.Thread(target=self._loop, name="lora-ui-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the scheduler thread; running jobs go on by themselves."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep scheduling; the next tick may succeed (e.g. a locked database)
                traceback.print_exc()

    def tick(self) -> None:
        """Record jobs that ended, then start queued jobs while fewer than `max_parallel` run."""
        with self._lock:
            for job in self.store.all(ACTIVE):
                self._refresh(job)
            running = len(self.store.all(ACTIVE))
            for job in self.store.all((QUEUED,)):
                if running >= self.max_parallel:
                    break
                self._start(job)
                running += 1

    def _start(self, job: Job) -> None:
        folder = job.folder
        (folder / EXIT_CODE_FILE).unlink(missing_ok=True)
        command = [sys.executable, "-m", "lora_scripts.ui.wrapper", str(folder), "--",
                   sys.executable, "-m", "lora_scripts.cli", *job.args]
        with (folder / LOG_FILE).open("ab") as log:
            log.write(f"\n$ {shlex.join(['lora-scripts', *job.args])}\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(command, cwd=job.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
            except OSError as exc:
                self.store.update(job.id, status=FAILED, error=f"could not start in {job.cwd}: {exc.strerror or exc}", finished=time.time())
                return
        self._children[job.id] = child
        self.store.update(job.id, status=RUNNING, pid=child.pid, started=time.time(), finished=None,
                          exit_code=None, error=None, stop_requested=0)

    def _refresh(self, job: Job) -> None:
        """If the job's process ended, record its exit code and final status."""
        child = self._children.get(job.id)
        if child is not None and child.poll() is None:
            return
        if child is None and _alive(job):
            return
        self._children.pop(job.id, None)
        code_file = job.folder / EXIT_CODE_FILE
        code = int(code_file.read_text()) if code_file.is_file() else None
        status, error = _outcome(job, code)
        self.store.update(job.id, status=status, exit_code=code, error=error, pid=None, finished=time.time())

    # -- actions ---------------------------------------------------------------------------

    def stop(self, job_id: int) -> Job:
        """Queued: take it out of the queue. Running: SIGTERM (the trainer checkpoints and exits);
        a second stop while it is stopping aborts it without a checkpoint, as a second Ctrl-C does."""
        with self._lock:
            job = self.get(job_id)
            if job.status == QUEUED:
                self.store.update(job.id, status=STOPPED, error="stopped before it started")
            elif job.status in ACTIVE:
                self.store.update(job.id, status=STOPPING, stop_requested=1)
                try:
                    os.kill(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # it ended meanwhile; the next tick records how
            else:
                raise UserError(f"job {job.id} is {job.status}; only a queued or running job can be stopped")
            return self.get(job_id)

    def resume(self, job_id: int) -> Job:
        """Queue a stopped or failed train job again; it continues from its newest checkpoint."""
        with self._lock:
            job = self.get(job_id)
            if job.kind != "train" or job.status not in (STOPPED, FAILED):
                raise UserError(f"job {job.id} is a {job.status} {job.kind} job; only a stopped or failed training can be resumed")
            args = job.args if job.args[-2:] == RESUME_ARGS else [*job.args, *RESUME_ARGS]
            self.store.update(job.id, status=QUEUED, args=args, queued=time.time(), error=None)
            return self.get(job_id)

    def remove(self, job_id: int) -> None:
        """Forget a job that is not running and delete its folder (log, config); its output_dir stays."""
        with self._lock:
            job = self.get(job_id)
            if job.status in ACTIVE:
                raise UserError(f"job {job.id} is {job.status}; stop it first")
            self.store.delete(job.id)
            shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, job_id: int) -> Job:
        """The job, or UserError if there is none with this id."""
        job = self.store.get(job_id)
        if job is None:
            raise UserError(f"no job {job_id}; it may have been removed")
        return job


def _alive(job: Job) -> bool:
    """Whether the job's wrapper still runs (its command line names the job folder: no pid reuse)."""
    if job.pid is None:
        return False
    if Path("/proc/self").exists():  # Linux: a zombie's cmdline is empty, another program's differs
        try:
            return job.job_dir.encode() in Path(f"/proc/{job.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
    try:
        os.kill(job.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _outcome(job: Job, code: int | None) -> tuple[str, str | None]:
    """(status, error) of an ended job from its exit code, its output_dir and its log."""
    if code is None:  # the wrapper itself was killed (a stop that came before it could pass it on)
        if job.stop_requested:
            return STOPPED, "stopped before it started"
        return FAILED, "the job's process ended without recording an exit code (killed?)"
    if code == 0:
        if job.kind != "train" or _finished(job):
            return DONE, None
        return STOPPED, "stopped with a checkpoint; resume continues it"
    if job.stop_requested:
        return STOPPED, "stopped before its first checkpoint" if code < 0 else f"stopped (exit code {code})"
    return FAILED, _error_line(job.folder / LOG_FILE) or f"exit code {code}"


def _finished(job: Job) -> bool:
    from lora_scripts.loop import CONFIG_FILE as FINAL_CONFIG

    return job.output_dir is not None and (Path(job.cwd) / job.output_dir / FINAL_CONFIG).is_file()


def _error_line(log: Path) -> str | None:
    """The CLI's `error: …` message (or the last line) of a failed job."""
    tail = live.log_tail(log, 40)
    errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
    return errors[-1] if errors else (tail[-1] if tail else None)
