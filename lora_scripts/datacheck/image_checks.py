"""Checks on the pixels of a dataset: size, aspect, duplicates, blur and style outliers.

Each check takes per-image measurements keyed by `ImageRecord.rel` and returns a Finding or None.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from scipy import ndimage

from lora_scripts.datacheck.report import Finding, noted_finding

# Images must have at least this many CLIP embeddings before outliers mean anything.
MIN_EMBEDDINGS_FOR_OUTLIERS = 5
# The relative blur test needs a median over enough images to be a fair reference.
MIN_IMAGES_FOR_RELATIVE_BLUR = 5


@dataclass(frozen=True)
class ImageCheckSettings:
    """Thresholds of the image checks; the defaults are what `check-data` uses."""

    max_aspect_ratio: float = 4.0
    # Hamming distance between 64-bit perceptual hashes (imagehash.phash) counted as "same picture".
    # A resized or re-compressed copy is 0-2 bits away, a blurred copy ~2; unrelated images 18+.
    near_duplicate_distance: int = 6
    # Sharpness = variance of the Laplacian of the grey image scaled to the training area
    # (resolution^2; never upscaled). Calibrated on photo-like images (smooth noise fields + shapes,
    # as in tests/test_datacheck.py) at 320-2048 px: sharp originals score 26-440; Gaussian-blurred
    # copies (radius >= 1.5 px at training scale) 1.5-9; copies upscaled 4x from a thumbnail 4-13.
    # pyimagesearch's rule of thumb for photos is 100; flat-colour illustrations score lower than
    # photos, hence a lower floor ...
    blur_floor: float = 15.0
    # ... plus a relative test: far less sharp than the set's median (a blurry screenshot among
    # crisp paintings) is flagged even above the floor.
    blur_relative: float = 0.2
    # Style outlier: cosine distance from the mean CLIP embedding above mean + k * std.
    outlier_std: float = 2.0
    # Shared caption: one caption used by more than this share of the images.
    shared_caption_share: float = 0.5


@dataclass(frozen=True)
class ImageMeasure:
    """What the checks need to know about one readable image."""

    width: int
    height: int
    pixel_sha256: str  # of the decoded RGB pixels: re-saved copies of one picture hash alike
    phash: int  # 64-bit perceptual hash
    sharpness: float


def measure_image(path: Path, resolution: int) -> ImageMeasure:
    """Decode `path` once and measure it (call verify_image first: this raises on broken files)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()
    return ImageMeasure(rgb.width, rgb.height, digest, int(str(imagehash.phash(rgb)), 16), _sharpness(rgb, resolution))


def _sharpness(image: Image.Image, resolution: int) -> float:
    """Variance of the Laplacian of the grey image at training scale (area ~ resolution^2)."""
    grey = image.convert("L")
    scale = resolution / math.sqrt(grey.width * grey.height)
    if scale < 1:  # measure what training sees; small images are left as they are
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BOX)
    return float(ndimage.laplace(np.asarray(grey, dtype=np.float32)).var())


def unreadable(reasons: Mapping[str, str]) -> Finding | None:
    """Files Pillow cannot fully decode (verify_image reasons)."""
    if not reasons:
        return None
    return Finding(
        "unreadable", "error",
        "Pillow cannot decode these files, so training would stop on them; replace them, or run with "
        "--fix to move them to rejected/", list(reasons), True, dict(reasons),
    )


def too_small(measures: Mapping[str, ImageMeasure], resolution: int) -> Finding | None:
    """Images whose area is below resolution^2: training upscales them, which blurs them."""
    notes = {}
    for rel, measure in measures.items():
        side = math.sqrt(measure.width * measure.height)
        if side < resolution:
            notes[rel] = f"{measure.width}x{measure.height}, upscaled x{resolution / side:.1f}"
    return noted_finding(
        "too_small", "warning",
        f"smaller than the training resolution {resolution}; upscaling makes them blurry (the guide advises >= 512x512): "
        "use larger originals or remove them", notes)


def extreme_aspect(measures: Mapping[str, ImageMeasure], max_ratio: float) -> Finding | None:
    """Very wide or very tall images: cropping or bucketing them loses most of the picture."""
    notes = {}
    for rel, measure in measures.items():
        ratio = max(measure.width, measure.height) / min(measure.width, measure.height)
        if ratio > max_ratio:
            notes[rel] = f"{measure.width}x{measure.height} ({ratio:.1f}:1)"
    return noted_finding(
        "extreme_aspect", "warning",
        f"aspect ratio beyond {max_ratio:g}:1; crop them to the subject", notes)


def exact_duplicates(measures: Mapping[str, ImageMeasure]) -> Finding | None:
    """Images with the same pixels as an earlier one (the first is kept, the copies listed)."""
    first_with_pixels: dict[str, str] = {}
    notes = {}
    for rel, measure in measures.items():
        original = first_with_pixels.setdefault(measure.pixel_sha256, rel)
        if original != rel:
            notes[rel] = f"same pixels as {original}"
    return noted_finding(
        "exact_duplicate", "warning",
        "copies train the same picture twice as often; delete them or run with --fix to move them to rejected/",
        notes)


def near_duplicates(measures: Mapping[str, ImageMeasure], max_distance: int) -> Finding | None:
    """Groups of images whose perceptual hashes differ by <= max_distance bits (exact copies excluded)."""
    exact_copies = exact_duplicates(measures)
    candidates = [rel for rel in measures if exact_copies is None or rel not in exact_copies.items]
    hashes = np.array([measures[rel].phash for rel in candidates], dtype=np.uint64)
    group_of: dict[str, str] = {}  # member -> first image of its group
    matched: dict[str, str] = {}  # member -> the earlier image it resembles, with the distance
    for i, rel in enumerate(candidates):
        distance_to_later = np.bitwise_count(hashes[i + 1:] ^ hashes[i])
        for offset in np.flatnonzero(distance_to_later <= max_distance):
            other = candidates[i + 1 + int(offset)]
            if other not in group_of:
                group_of[other] = group_of.get(rel, rel)
                matched[other] = f"looks like {rel} (phash distance {int(distance_to_later[offset])})"
    if not group_of:
        return None
    notes = dict(matched)
    for first in set(group_of.values()):
        notes[first] = "looks like " + ", ".join(member for member, group in group_of.items() if group == first)
    items = [rel for rel in candidates if rel in notes]
    return Finding(
        "near_duplicate", "warning",
        "near-identical pictures (resized, re-compressed, blurred or slightly edited copies) over-weight one "
        "image; keep the best of each group", items, False, notes,
    )


def blurry(measures: Mapping[str, ImageMeasure], settings: ImageCheckSettings) -> Finding | None:
    """Images whose sharpness is below the floor, or far below the set's median."""
    if not measures:
        return None
    median = statistics.median(measure.sharpness for measure in measures.values())
    relative_limit = settings.blur_relative * median if len(measures) >= MIN_IMAGES_FOR_RELATIVE_BLUR else 0.0
    limit = max(settings.blur_floor, relative_limit)
    notes = {
        rel: f"sharpness {measure.sharpness:.1f} < {limit:.1f} (set median {median:.1f})"
        for rel, measure in measures.items() if measure.sharpness < limit
    }
    return noted_finding(
        "blurry", "warning",
        "blurry images (soft scans, upscaled screenshots) teach the LoRA blur; replace them with sharp originals",
        notes)


def style_outliers(rels: list[str], embeddings: Mapping[str, np.ndarray] | None, outlier_std: float) -> Finding:
    """Images whose CLIP embedding is far from the set's mean (a different style or subject).

    `embeddings` maps image paths relative to train_data_dir to CLIP image embeddings, as the
    labeling tool saves them (`--embeddings-out`). Without them the check is skipped, said as info.
    """
    known = [rel for rel in rels if embeddings is not None and rel in embeddings]
    if len(known) < MIN_EMBEDDINGS_FOR_OUTLIERS:
        reason = "no CLIP embeddings given" if not known else f"only {len(known)} image(s) have CLIP embeddings"
        return Finding(
            "style_outlier", "info",
            f"skipped: {reason}; run the labeling tool with --embeddings-out and pass the file to check-data",
        )
    assert embeddings is not None
    vectors = np.stack([np.asarray(embeddings[rel], dtype=np.float64) for rel in known])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    centre = vectors.mean(axis=0)
    distances = 1.0 - vectors @ (centre / np.linalg.norm(centre))
    limit = float(distances.mean() + outlier_std * distances.std())
    notes = {
        rel: f"cosine distance {distance:.3f} from the set's mean (limit {limit:.3f})"
        for rel, distance in zip(known, distances) if distance > limit
    }
    message = (
        "unlike the rest of the set (another style or subject, a sketch among finished work); keep the set "
        "consistent or move these to their own subset" if notes else f"no outliers among {len(known)} embedded images"
    )
    return Finding("style_outlier", "warning" if notes else "info", message, list(notes), False, notes)
