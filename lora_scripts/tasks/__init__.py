"""Task types: each module here defines `TASK`, the one object the loop, the CLI, the data check
and generate ask about that task (see `tasks/base.py`).

Modules are imported when their task is asked for, so a text run does not pay for diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_scripts.tasks.base import Task

TASK_MODULES = {
    "text-generation": "lora_scripts.tasks.text",
    "image": "lora_scripts.tasks.image",
}


def get_task(task_type: str) -> Task:
    """The registered task for a config's `task_type`."""
    return importlib.import_module(TASK_MODULES[task_type]).TASK
