"""Fault injection for the crash-safety tests, off unless LORA_SCRIPTS_FAULT is set.

`LORA_SCRIPTS_FAULT="kill_after_step:5"` SIGKILLs the process right after optimizer step 5;
other points: `kill_mid_accumulation:N` (after the first micro-batch of step N),
`kill_during_save:N` (checkpoint N half written), `nan_loss:N` (the loss of step N
becomes NaN), `oom:N` (step N raises an out-of-memory error once). Several: comma-separated.
"""

from __future__ import annotations

import os
import signal

_fired: set[str] = set()


def fault_due(point: str, step: int) -> bool:
    """Whether the fault `point:step` was requested (each fires once per process)."""
    wanted = {item.strip() for item in os.environ.get("LORA_SCRIPTS_FAULT", "").split(",") if item.strip()}
    key = f"{point}:{step}"
    if key in wanted and key not in _fired:
        _fired.add(key)
        return True
    return False


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL this process when `point:step` was requested: no cleanup, as a power cut."""
    if fault_due(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
