"""`python -m lora_scripts.ui.wrapper JOB_DIR -- COMMAND...`: run one job and record how it ended.

The UI starts this in a session of its own with stdout/stderr going to the job's log file, so
the job outlives the UI. SIGTERM/SIGINT are passed on to the command (the trainer stops
gracefully and writes a checkpoint); when the command ends, its exit code is written to
`JOB_DIR/exit_code`, which a restarted UI reads to learn how the run ended.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from lora_scripts.atomic import write_bytes_atomically

EXIT_CODE_FILE = "exit_code"


def main(argv: list[str]) -> int:
    """Run the command after `--`, forward stop signals to it, record its exit code."""
    job_dir, separator, command = Path(argv[0]), argv[1], argv[2:]
    if separator != "--" or not command:
        print("usage: python -m lora_scripts.ui.wrapper JOB_DIR -- COMMAND...", file=sys.stderr)
        return 2
    pending: list[int] = []  # a signal that came before the child existed
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen(command)
    for signum in pending:
        child.send_signal(signum)
    code = child.wait()
    write_bytes_atomically(job_dir / EXIT_CODE_FILE, str(code).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
