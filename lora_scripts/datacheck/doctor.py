"""`check_image_dataset`: every image and caption check over an ImageIndex, as one Report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from lora_scripts.data import image_index as ix
from lora_scripts.datacheck import caption_checks, image_checks
from lora_scripts.datacheck.image_checks import ImageCheckSettings, ImageMeasure
from lora_scripts.datacheck.report import Finding, Report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# One line per DataProblem kind: what it means for training and how to fix it.
PROBLEM_SUMMARIES = {
    ix.PATH_OUTSIDE_DATASET: "filenames must stay inside train_data_dir (no ../, absolute paths or outside links)",
    ix.MISSING_FILE: "listed in the metadata but not found; fix the filename or remove the row",
    ix.BAD_ROW: "metadata rows without a filename",
    ix.DUPLICATE_ROW: "the same image listed twice; only the first row is used",
    ix.UNREADABLE_CAPTION: "caption files that are not UTF-8 text",
    ix.MISSING_CAPTION: "images without a caption train as unconditional; write one per image",
    ix.UNLISTED_IMAGE: "images in the folder that the metadata does not list; add rows for them or move them out",
    ix.IGNORED_FOLDER: "folders that are not trained",
}


def check_image_dataset(
    index: ix.ImageIndex,
    resolution: int,
    clip_tokenizer: PreTrainedTokenizerBase | None = None,
    embeddings: Mapping[str, np.ndarray] | None = None,
    settings: ImageCheckSettings = ImageCheckSettings(),
) -> Report:
    """Check an image dataset for what hurts a LoRA: layout problems, unreadable files, small,
    extreme-aspect, duplicate, near-duplicate and blurry images, style outliers, and captions that
    are missing, over CLIP's 77 tokens, or shared by most images.

    `clip_tokenizer`: a transformers CLIPTokenizer for exact caption lengths (else approximate).
    `embeddings`: CLIP image embeddings keyed by image path relative to train_data_dir, as the
    labeling tool writes them; without them the style-outlier check is skipped (an info finding).
    The report's `has_blocking` is what `check-data` turns into its exit code.
    """
    findings = _problem_findings(index.problems)
    reasons: dict[str, str] = {}
    measures: dict[str, ImageMeasure] = {}
    for record in index.records:
        reason = ix.verify_image(record.path)
        if reason is None:
            measures[record.rel] = image_checks.measure_image(record.path, resolution)
        else:
            reasons[record.rel] = reason
    embedding_keys = {record.path.relative_to(index.root).as_posix(): record.rel for record in index.records}
    embeddings_by_rel = None if embeddings is None else {
        embedding_keys[key]: vector for key, vector in embeddings.items() if key in embedding_keys
    }
    checks = [
        image_checks.unreadable(reasons),
        image_checks.too_small(measures, resolution),
        image_checks.extreme_aspect(measures, settings.max_aspect_ratio),
        image_checks.exact_duplicates(measures),
        image_checks.near_duplicates(measures, settings.near_duplicate_distance),
        image_checks.blurry(measures, settings),
        image_checks.style_outliers(list(measures), embeddings_by_rel, settings.outlier_std),
        caption_checks.caption_too_long(index.records, clip_tokenizer),
        caption_checks.shared_caption(index.records, settings.shared_caption_share),
    ]
    findings += [finding for finding in checks if finding is not None]
    stats = {
        "train_data_dir": str(index.root),
        "captions_from": index.metadata_path.name if index.metadata_path else "caption files",
        "images": len(index.records),
        "readable_images": len(measures),
        "images_per_epoch": sum(record.repeats for record in index.records),
        "resolution": resolution,
        "caption_token_count": "CLIP tokenizer" if clip_tokenizer is not None else "approximate",
        "tag_frequency": caption_checks.tag_frequency(index.records),
    }
    return Report(findings, stats, {record.rel: record.path for record in index.records})


def _problem_findings(problems: list[ix.DataProblem]) -> list[Finding]:
    """One finding per problem kind, each problem's message as its item's note."""
    by_kind: dict[str, list[ix.DataProblem]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    return [
        Finding(
            kind, "error" if any(p.blocking for p in group) else "warning", PROBLEM_SUMMARIES[kind],
            [p.where for p in group], any(p.blocking for p in group), {p.where: p.message for p in group},
        )
        for kind, group in by_kind.items()
    ]
