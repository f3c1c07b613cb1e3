"""Data page API: the dataset doctor, thumbnails, caption editing, and auto-labelling jobs."""

from __future__ import annotations

import argparse
import io
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel

from lora_scripts.data.image_index import index_image_dataset, is_image_file
from lora_scripts.errors import UserError
from lora_scripts.labeling.args import build_label_parser
from lora_scripts.ui.api_config import checked_config
from lora_scripts.ui.api_jobs import job_summary
from lora_scripts.ui.context import UiContext, context
from lora_scripts.ui.captions import write_caption
from lora_scripts.ui.store import QUEUED

router = APIRouter()
THUMBNAIL_SIDE = 160


class ValuesBody(BaseModel):
    values: dict[str, str]


class CaptionBody(ValuesBody):
    rel: str
    caption: str


class LabelBody(BaseModel):
    """The options of `lora-scripts label`, as the data page's form sends them."""

    input: str
    output: str | None = None
    sidecars: bool = False
    model: str = "models/clip"
    labels: list[str] = []
    categories: str | None = None
    trigger: str | None = None
    top_k: int = 1
    threshold: float = 0.0
    overwrite: bool = False


class _RaisingParser(argparse.ArgumentParser):
    """The label command's parser, raising UserError instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"label: {message}")


def _thumb_url(path: str) -> str:
    return f"/api/thumb?path={quote(path)}"


@router.post("/data/check")
def check_data(body: ValuesBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """The dataset doctor on the form's data (`lora-scripts check-data`), with a thumbnail per flagged image."""
    from lora_scripts.tasks import get_task

    _, cfg = checked_config(ui, body.values)
    report = get_task(cfg.task_type).data_report(cfg, None).report
    result = report.to_json()
    thumbs = {item: _thumb_url(str(path)) for item, path in report.image_paths.items()}
    for finding in result["findings"]:
        finding["thumbs"] = {item: thumbs[item] for item in finding["items"] if item in thumbs}
    result["summary"] = report.format_terminal().splitlines()[0]
    return result


@router.post("/data/captions")
def list_captions(body: ValuesBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Every image of the form's image folder with its caption and where that caption lives."""
    _, cfg = checked_config(ui, body.values)
    index = index_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    records = [{"rel": r.rel, "caption": r.caption, "source": r.source, "thumb": _thumb_url(str(r.path))} for r in index.records]
    return {"root": str(index.root), "metadata": str(index.metadata_path) if index.metadata_path else None, "images": records}


@router.post("/data/caption")
def edit_caption(body: CaptionBody, ui: UiContext = Depends(context)) -> dict[str, str]:
    """Write one caption (metadata.csv row or caption file), atomically."""
    _, cfg = checked_config(ui, body.values)
    index = index_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    written = write_caption(index, body.rel, body.caption)
    return {"written": str(written), "caption": " ".join(body.caption.split())}


@router.post("/data/label")
def queue_label(body: LabelBody, ui: UiContext = Depends(context)) -> dict[str, Any]:
    """Queue `lora-scripts label` on a folder (CLIP zero-shot captions) as a job."""
    folder = ui.guard.check(body.input, "--input")
    if not folder.is_dir():
        raise UserError(f"--input {body.input} is not a folder")
    args = ["label", "--input", str(folder), "--model", str(ui.guard.check(body.model, "--model"))]
    if body.output:
        args += ["--output", str(ui.guard.check(body.output, "--output"))]
    if body.categories:
        args += ["--categories", str(ui.guard.check(body.categories, "--categories"))]
    labels = [label.strip() for label in body.labels if label.strip()]
    if labels:
        args += ["--labels", *labels]
    args += [*(["--sidecars"] if body.sidecars else []), *(["--overwrite"] if body.overwrite else []),
             *(["--trigger", body.trigger] if body.trigger else []),
             "--top-k", str(body.top_k), "--threshold", str(body.threshold)]
    build_label_parser(_RaisingParser(prog="lora-scripts label")).parse_args(args[1:])
    if not body.output and not body.sidecars:
        raise UserError("nothing to write: give an output metadata.csv or tick .txt sidecars")
    job = ui.store.add(f"label {folder.name}", "label", str(ui.settings.cwd), None)
    (ui.jobs_dir / str(job.id)).mkdir(parents=True, exist_ok=True)
    ui.store.update(job.id, status=QUEUED, job_dir=str(ui.jobs_dir / str(job.id)), args=args)
    ui.runner.tick()
    return job_summary(ui.store.get(job.id))


@router.get("/thumb")
def thumbnail(path: str, ui: UiContext = Depends(context)) -> Response:
    """A small JPEG of an image inside the allowed roots."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    image_path = ui.guard.check(path, "image")
    if not image_path.is_file() or not is_image_file(image_path):
        raise UserError(f"{path} is not an image file")
    try:
        with Image.open(image_path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot be shown ({exc})") from None
    return Response(buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-cache"})
