"""What every API route needs: the UI's settings, the folders it may use, the job store and runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from lora_scripts.ui.jobs import JobRunner
from lora_scripts.ui.live import ScalarReader
from lora_scripts.ui.security import PathGuard
from lora_scripts.ui.store import JobStore


@dataclass
class UiSettings:
    """How `lora-scripts ui` was started."""

    state_dir: Path
    cwd: Path = field(default_factory=Path.cwd)
    token: str | None = None
    allowed_roots: list[Path] = field(default_factory=list)  # besides cwd and state_dir
    max_parallel: int | None = None  # None: keep the stored setting (1 at first)
    scheduler: bool = True  # run the queue in a background thread (tests may tick by hand)
    job_env: dict[str, str] | None = None  # environment of job processes (default: the UI's)


@dataclass
class UiContext:
    """What every route needs: settings, folders it may use, the job store and runner."""

    settings: UiSettings
    guard: PathGuard
    store: JobStore
    runner: JobRunner
    scalars: ScalarReader

    @property
    def jobs_dir(self) -> Path:
        """Where each job's folder (config, log, exit code) goes."""
        return self.settings.state_dir / "jobs"


def context(request: Request) -> UiContext:
    """The UiContext of the app serving `request` (a FastAPI dependency)."""
    return request.app.state.ui
