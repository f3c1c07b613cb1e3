"""`lora-scripts label` / `tools/auto_label.py`: CLIP zero-shot captions for a training folder.

Each image is scored against candidate labels with a local CLIP model; the caption is the best
label of each category joined with ", " (optionally after a trigger word). Captions a person
already wrote (non-blank metadata.csv prompts or .txt sidecars) are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lora_scripts.atomic import write_bytes_atomically
from lora_scripts.errors import UserError
from lora_scripts.labeling.candidates import Selection, load_label_sets
from lora_scripts.labeling.clip_model import ClipEncoder
from lora_scripts.data.image_index import IMAGE_EXTENSIONS
from lora_scripts.labeling.images import find_images, load_images
from lora_scripts.labeling.outputs import (
    MetadataCsv,
    has_sidecar_caption,
    sidecar_path,
    write_embeddings,
)

@dataclass
class _Targets:
    """Which images need a caption in each output, and how many existing captions are kept."""

    csv: set[str] = field(default_factory=set)
    sidecars: set[str] = field(default_factory=set)
    csv_kept: int = 0
    sidecars_kept: int = 0


def _plan_targets(args: argparse.Namespace, images: list[str], metadata: MetadataCsv | None) -> _Targets:
    """Images without a non-blank caption in each requested output (all of them with --overwrite)."""
    targets = _Targets()
    if metadata is not None:
        existing = set() if args.overwrite else metadata.captioned()
        targets.csv = {image for image in images if image not in existing}
        targets.csv_kept = len(images) - len(targets.csv)
    if args.sidecars:
        targets.sidecars = {image for image in images if args.overwrite or not has_sidecar_caption(args.input, image)}
        targets.sidecars_kept = len(images) - len(targets.sidecars)
    return targets


def _caption_images(
    encoder: ClipEncoder,
    embeddings: dict[str, torch.Tensor],
    label_sets: dict[str, list[str]],
    selection: Selection,
    trigger: str | None,
) -> dict[str, str]:
    """Trigger word, then the picked labels of each category in category order, joined with ', '.

    CLIP's zero-shot probabilities are softmax(logit_scale * cosine similarity) within each category.
    An image left with no words at all (strict threshold, no trigger) gets no caption.
    """
    if not embeddings:
        return {}
    paths = list(embeddings)
    image_matrix = torch.stack([embeddings[path] for path in paths])
    probabilities = {
        category: (encoder.logit_scale * image_matrix @ encoder.embed_texts(labels).T).softmax(dim=-1)
        for category, labels in label_sets.items()
    }
    captions: dict[str, str] = {}
    for row, path in enumerate(paths):
        parts = [trigger] if trigger else []
        for category, labels in label_sets.items():
            parts += selection.pick(probabilities[category][row], labels)
        if parts:
            captions[path] = ", ".join(parts)
    return captions


def _encode_dataset(
    encoder: ClipEncoder, root: Path, paths: list[str], batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unit image embeddings of every readable image, in batches, and `{path: reason}` for the rest."""
    embeddings: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}
    with tqdm(total=len(paths), desc="CLIP", unit="img") as progress:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            loaded, images, batch_failed = load_images(root, batch)
            failed |= batch_failed
            if images:
                embeddings |= dict(zip(loaded, encoder.embed_images(images)))
            progress.update(len(batch))
    return embeddings, failed


def run_label(args: argparse.Namespace) -> int:
    """Caption (and/or embed) the images of `args.input`; returns the exit code (0).

    Raises UserError for user mistakes: missing folder or model, no images, bad label files.
    """
    if not args.input.is_dir():
        raise UserError(f"--input {args.input} is not a folder")
    if args.output is None and not args.sidecars and args.embeddings_out is None:
        raise UserError("nothing to write: pass --output metadata.csv, --sidecars and/or --embeddings-out FILE.npz")
    wants_captions = args.output is not None or args.sidecars
    label_sets = load_label_sets(args.labels, args.labels_file, args.categories) if wants_captions else {}
    images = find_images(args.input)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {args.input}")
    metadata = MetadataCsv.read(args.output) if args.output is not None else None
    targets = _plan_targets(args, images, metadata)
    to_caption = targets.csv | targets.sidecars
    to_encode = images if args.embeddings_out is not None else sorted(to_caption)

    if not to_encode:
        print(f"nothing to do: all {len(images)} images already have captions (pass --overwrite to replace them)")
        return 0

    encoder = ClipEncoder.load(args.model, args.device)
    embeddings, failed = _encode_dataset(encoder, args.input, to_encode, args.batch_size)
    for path, reason in failed.items():
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if len(failed) == len(images):
        raise UserError(f"none of the {len(images)} images in {args.input} could be read")
    selection = Selection(args.top_k, args.threshold, args.threshold_strict)
    to_caption_embeddings = {path: vector for path, vector in embeddings.items() if path in to_caption}
    captions = _caption_images(encoder, to_caption_embeddings, label_sets, selection, args.trigger)
    if len(captions) < len(to_caption_embeddings):
        print(f"{len(to_caption_embeddings) - len(captions)} image(s) had no label above --threshold; left uncaptioned")
    _write_outputs(args, targets, metadata, captions, embeddings)
    if failed:
        print(f"{len(failed)} unreadable image(s) skipped (listed above)")
    return 0


def _write_outputs(
    args: argparse.Namespace,
    targets: _Targets,
    metadata: MetadataCsv | None,
    captions: dict[str, str],
    embeddings: dict[str, torch.Tensor],
) -> None:
    """Write every requested output and print one summary line for each."""
    if metadata is not None:
        new_rows = {path: text for path, text in captions.items() if path in targets.csv}
        metadata.update(new_rows)
        metadata.write(args.output)
        kept = f"{targets.csv_kept} kept{_overwrite_hint(args, targets.csv_kept)}"
        print(f"{args.output}: {len(new_rows)} captions written, {kept}")
    if args.sidecars:
        new_sidecars = sorted(targets.sidecars & captions.keys())
        for path in new_sidecars:
            write_bytes_atomically(sidecar_path(args.input, path), captions[path].encode("utf-8"))
        kept = f"{targets.sidecars_kept} kept{_overwrite_hint(args, targets.sidecars_kept)}"
        print(f".txt sidecars: {len(new_sidecars)} written, {kept}")
    if args.embeddings_out is not None:
        write_embeddings(args.embeddings_out, {path: vector.numpy() for path, vector in embeddings.items()})
        print(f"{args.embeddings_out}: {len(embeddings)} unit CLIP image embeddings")


def _overwrite_hint(args: argparse.Namespace, kept: int) -> str:
    return " (pass --overwrite to replace them)" if kept and not args.overwrite else ""
