"""Helpers of the web UI tests: the app in-process, the real server as a subprocess, waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import REPO

ARTIFACTS = REPO / "tests" / "artifacts" / "ui"
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models run fastest on one thread


def text_values(tmp_path: Path, model_dir: Path, output_dir: str, **changes: str) -> dict[str, str]:
    """Config form texts for a short run of the tiny Llama on the QA rows (tests/helpers.text_config)."""
    from tests.helpers import write_qa_jsonl

    data = tmp_path / "qa.jsonl"
    if not data.exists():
        write_qa_jsonl(data)
    values = {
        "task_type": "text-generation", "base_model": str(model_dir), "train_data_dir": str(data),
        "prompt_template": "问：{question}\n答：{answer}", "output_dir": output_dir, "lora_rank": "4",
        "batch_size": "4", "max_steps": "6", "learning_rate": "2e-3", "save_steps": "0", "logging_steps": "1", "seed": "3",
    }
    values.update(changes)
    return values


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(cwd: Path, state_dir: Path, port: int, *extra: str, log: Path) -> subprocess.Popen:
    """`lora-scripts ui` as a user starts it, answering on 127.0.0.1:port when this returns."""
    handle = log.open("ab")
    process = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "ui", "--port", str(port), "--state-dir", str(state_dir), *extra],
                               cwd=cwd, env=JOB_ENV, stdout=handle, stderr=subprocess.STDOUT)

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the UI exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/settings", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(answers, 90, "the UI server to answer")
    return process
