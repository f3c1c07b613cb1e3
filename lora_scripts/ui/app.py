"""The FastAPI application: access rules, error format, the API routers, static pages."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lora_scripts.errors import UserError
from lora_scripts.ui import api_config, api_data, api_jobs
from lora_scripts.ui.context import UiContext, UiSettings
from lora_scripts.ui.jobs import JobRunner
from lora_scripts.ui.live import ScalarReader
from lora_scripts.ui.security import PathGuard, access_middleware
from lora_scripts.ui.store import JobStore

STATIC = Path(__file__).parent / "static"


def create_app(settings: UiSettings) -> FastAPI:
    """The web app for `settings`; its lifespan runs the job scheduler."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.state_dir / "ui.sqlite3")
    runner = JobRunner(store, settings.job_env)
    if settings.max_parallel is not None:
        runner.set_max_parallel(settings.max_parallel)
    guard = PathGuard([settings.cwd, settings.state_dir, *settings.allowed_roots], settings.cwd)
    ui = UiContext(settings, guard, store, runner, ScalarReader())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Import the trainer's modules once now, not inside the first request that needs them.
        threading.Thread(target=_warm_up, name="lora-ui-warm-up", daemon=True).start()
        runner.tick()  # re-attach: record jobs that ended while no UI was running
        if settings.scheduler:
            runner.start_background()
        yield
        runner.shutdown()

    app = FastAPI(title="lora-scripts", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = ui
    app.middleware("http")(access_middleware(settings.token))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    for module in (api_config, api_jobs, api_data):
        app.include_router(module.router, prefix="/api")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    return app


def _warm_up() -> None:
    import lora_scripts.loop  # noqa: F401  (torch, transformers, the tasks: several seconds)


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/lora-scripts-ui`, else `~/.local/state/lora-scripts-ui`."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lora-scripts-ui"
