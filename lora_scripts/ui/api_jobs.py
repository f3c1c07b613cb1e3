"""Jobs API: queue runs, watch them, stop/resume/remove/re-run, download results, compare runs."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from lora_scripts.atomic import write_bytes_atomically
from lora_scripts.errors import UserError
from lora_scripts.ui import form, live
from lora_scripts.ui.api_config import checked_config
from lora_scripts.ui.context import UiContext, context
from lora_scripts.ui.jobs import CONFIG_FILE, LOG_FILE
from lora_scripts.ui.store import ACTIVE, NEW, QUEUED, Job

router = APIRouter()
SCORES_FILE = "demo_scores.json"  # `lora-scripts demo` writes the before/after eval scores here


class QueueBody(BaseModel):
    values: dict[str, str]
    name: str | None = None


class RerunBody(BaseModel):
    changes: dict[str, str] = {}  # form texts replacing the job's (a blank text unsets the key)
    name: str | None = None


class SettingsBody(BaseModel):
    max_parallel: int


def queue_train(ui: UiContext, values: dict[str, str], name: str | None) -> Job:
    """Check a form as `lora-scripts train` would before loading weights, then queue it.

    Raises UserError (nothing written) for an invalid config, a path outside the allowed roots,
    an output_dir another job uses or that holds a run, or inputs the task's preflight refuses.
    """
    from lora_scripts.output_dir import check_output_dir
    from lora_scripts.tasks import get_task

    raw, cfg = checked_config(ui, values)
    output_dir = ui.guard.check(cfg.output_dir, "`output_dir`")
    for other in ui.store.all((NEW, QUEUED, *ACTIVE)):
        if other.output_dir == str(output_dir):
            raise UserError(f"output_dir {cfg.output_dir} is already used by job {other.id} ({other.status}); choose another output_dir")
    check_output_dir(cfg)
    get_task(cfg.task_type).preflight(cfg)
    job = ui.store.add(name or output_dir.name, "train", str(ui.settings.cwd), str(output_dir))
    folder = ui.jobs_dir / str(job.id)
    try:
        write_bytes_atomically(folder / CONFIG_FILE, form.to_yaml(raw).encode("utf-8"))
    except OSError as exc:
        ui.store.delete(job.id)
        raise UserError(f"cannot write the job's config in {folder}: {exc.strerror or exc}") from None
    ui.store.update(job.id, status=QUEUED, job_dir=str(folder), args=["train", "--config", str(folder / CONFIG_FILE)])
    return ui.store.get(job.id)


def job_values(job: Job) -> dict[str, str]:
    """The form texts of a train job's saved config."""
    path = job.folder / CONFIG_FILE
    return form.raw_to_values(form.parse_yaml(path.read_text(encoding="utf-8"), str(path))) if path.is_file() else {}


def job_summary(job: Job) -> dict[str, Any]:
    """A job row with its progress (from its log)."""
    return {**job.to_json(), "progress": live.progress(live.log_tail(job.folder / LOG_FILE, 30)) if job.job_dir else None,
            "command": form.shell_text(["lora-scripts", *job.args])}


def _output_dir(job: Job) -> Path:
    if job.output_dir is None:
        raise UserError(f"job {job.id} ({job.kind}) has no output folder")
    return Path(job.output_dir)


@router.get("/jobs")
def list_jobs(ui: UiContext = Depends(context)) -> list[dict[str, Any]]:
    """Every job, queue order."""
    return [job_summary(job) for job in ui.store.all()]


@router.post("/jobs")
def create_job(body: QueueBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Queue a training run of the form's config."""
    job = queue_train(ui, body.values, body.name)
    ui.runner.tick()
    return job_summary(ui.store.get(job.id))


@router.get("/jobs/{job_id}")
def get_job(job_id: int, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """A job, its config as form texts and YAML."""
    job = ui.runner.get(job_id)
    values = job_values(job)
    return {**job_summary(job), "values": values, "yaml": form.to_yaml(form.values_to_raw(values)) if values else ""}


@router.get("/jobs/{job_id}/live")
def live_view(job_id: int, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Everything the job page shows: progress, scalars, samples, log tail, files, checkpoints."""
    job = ui.runner.get(job_id)
    tail = live.log_tail(job.folder / LOG_FILE)
    view: dict[str, Any] = {"job": job_summary(job), "log": tail, "progress": live.progress(tail)}
    if job.output_dir is not None:
        out = Path(job.output_dir)
        view |= {"scalars": ui.scalars.read(out / "logs"), "samples": live.samples(out),
                 "files": live.final_files(out), "checkpoints": live.checkpoints(out)}
    return view


@router.post("/jobs/{job_id}/stop")
def stop_job(job_id: int, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Graceful stop: the trainer finishes its step and writes a checkpoint (resumable)."""
    return job_summary(ui.runner.stop(job_id))


@router.post("/jobs/{job_id}/resume")
def resume_job(job_id: int, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Queue a stopped or failed run again with `--set resume=true`."""
    job = ui.runner.resume(job_id)
    ui.runner.tick()
    return job_summary(ui.store.get(job.id))


@router.post("/jobs/{job_id}/rerun")
def rerun_job(job_id: int, body: RerunBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Queue a new run: this job's config with `changes` (usually a new output_dir)."""
    job = ui.runner.get(job_id)
    if job.kind != "train":
        raise UserError(f"job {job.id} is a {job.kind} job; re-run it from the data page")
    new = queue_train(ui, job_values(job) | body.changes, body.name)
    ui.runner.tick()
    return job_summary(ui.store.get(new.id))


@router.delete("/jobs/{job_id}")
def remove_job(job_id: int, ui: UiContext = Depends(context)) -> dict[str, str]:
    """Forget a job (not running); its output_dir is kept."""
    ui.runner.remove(job_id)
    return {"removed": str(job_id)}


@router.get("/jobs/{job_id}/output/{name:path}")
def output_file(job_id: int, name: str, download: bool = False, ui: UiContext = Depends(context)) -> FileResponse:
    """A file of the job's output_dir (a sample image, the LoRA, an export)."""
    out = _output_dir(ui.runner.get(job_id)).resolve()
    path = (out / name).resolve()
    if not path.is_relative_to(out) or not path.is_file():
        raise UserError(f"{name} is not a file of job {job_id}'s output_dir")
    return FileResponse(path, filename=path.name if download else None,
                        content_disposition_type="attachment" if download else "inline")


@router.get("/jobs/{job_id}/download.zip")
def download_zip(job_id: int, ui: UiContext = Depends(context)) -> Response:
    """The final files of a run (the LoRA, its exports, config and curve) as one zip."""
    job = ui.runner.get(job_id)
    out = _output_dir(job)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in live.final_files(out):
            archive.write(out / item["name"], f"{out.name}/{item['name']}")
    headers = {"Content-Disposition": f'attachment; filename="{out.name}.zip"'}
    return Response(buffer.getvalue(), media_type="application/zip", headers=headers)


@router.get("/settings")
def get_settings(ui: UiContext = Depends(context)) -> dict[str, Any]:
    """The queue's settings and the folders the UI may use."""
    return {"max_parallel": ui.runner.max_parallel, "allowed_roots": [str(r) for r in ui.guard.roots], "cwd": str(ui.settings.cwd)}


@router.put("/settings")
def put_settings(body: SettingsBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Change how many jobs run at once."""
    ui.runner.set_max_parallel(body.max_parallel)
    ui.runner.tick()
    return get_settings(ui)


@router.get("/compare")
def compare(ids: list[int] = Query(...), ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Several runs side by side: loss curves, config keys that differ, samples at equal steps,
    eval scores (`demo_scores.json`) and their final files."""
    jobs = [ui.runner.get(job_id) for job_id in ids]
    runs, configs = [], []
    for job in jobs:
        out = _output_dir(job)
        scalars = ui.scalars.read(out / "logs")
        scores_file = out / SCORES_FILE
        runs.append({"id": job.id, "name": job.name, "status": job.status, "output_dir": str(out),
                     "loss": scalars.get("loss", []), "eval_loss": scalars.get("eval_loss", []),
                     "samples": {s["step"]: s["path"] for s in live.samples(out)},
                     "scores": json.loads(scores_file.read_text(encoding="utf-8")) if scores_file.is_file() else None,
                     "files": live.final_files(out)})
        raw = form.values_to_raw(job_values(job))
        cfg, _ = form.validate(raw)
        configs.append(cfg.model_dump(mode="json") if cfg is not None else raw)
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differing = {k: [c.get(k) for c in configs] for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1}
    steps = sorted({step for run in runs for step in run["samples"]})
    shared = [s for s in steps if sum(s in run["samples"] for run in runs) > 1]
    return {"runs": runs, "differing": differing, "sample_steps": shared}
