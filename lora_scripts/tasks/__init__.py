"""Task modules: each turns a config into a `Task` the shared loop trains.

Chosen by `task_type` from a small registry; the image task is imported lazily so a text run
does not pay for diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_scripts.config import TrainConfig
    from lora_scripts.tasks.base import Task

TASK_BUILDERS = {
    "text-generation": "lora_scripts.tasks.text:build_text_task",
    "image": "lora_scripts.tasks.image:build_image_task",
}


def build_task(cfg: TrainConfig, device: str) -> Task:
    """Build the task named by `cfg.task_type`."""
    module_name, func_name = TASK_BUILDERS[cfg.task_type].split(":")
    return getattr(importlib.import_module(module_name), func_name)(cfg, device)


def preflight(cfg: TrainConfig) -> None:
    """Cheap checks of the task's inputs, run before any weights are loaded."""
    module_name, _ = TASK_BUILDERS[cfg.task_type].split(":")
    importlib.import_module(module_name).preflight(cfg)
