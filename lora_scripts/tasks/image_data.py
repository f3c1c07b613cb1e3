"""The image task's data: which images train (bad ones reported, then refused or skipped), where
each goes in its bucket, and the collate that turns samples into a batch.

Per-step randomness (caption shuffle and dropout, mirror, random crop) draws from torch's global
RNG, which the loop saves in every checkpoint, so a resumed run repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lora_scripts.config import TrainConfig
from lora_scripts.data.image_buckets import BucketSettings, ImageTooSmall, Placement, place_image
from lora_scripts.data.image_cache import file_sha256
from lora_scripts.data.image_index import MISSING_CAPTION, PATH_OUTSIDE_DATASET, ImageRecord, index_image_dataset, verify_image
from lora_scripts.data.image_pixels import training_pixels, upright_size
from lora_scripts.errors import UserError
from lora_scripts.tasks.base import Batch

PROBLEMS_SHOWN = 20


def bucket_settings(cfg: TrainConfig, resolution: int) -> BucketSettings:
    """The config's bucket keys at the family's resolution."""
    return BucketSettings(resolution, cfg.bucket_reso_steps, cfg.enable_bucket, cfg.bucket_no_upscale,
                          cfg.min_bucket_reso, cfg.max_bucket_reso)


@dataclass
class ImageSample:
    """One training image, placed in its bucket; `latents` are filled when cached."""

    record: ImageRecord
    content_hash: str  # sha256 of the file
    size: tuple[int, int]  # upright (width, height) of the file
    placement: Placement
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None


def select_images(cfg: TrainConfig, resolution: int, report: bool) -> list[ImageSample]:
    """The usable images of train_data_dir, each placed in its bucket.

    Bad: listed but missing, unreadable or truncated, without a caption, or too small to train
    without upscaling. With `report` the bad ones are printed. Raises UserError for a filename
    leading outside train_data_dir, for any bad image unless `skip_bad_images`, and when no
    image is left.
    """
    index = index_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    outside = [p for p in index.problems if p.kind == PATH_OUTSIDE_DATASET]
    if outside:
        first = outside[0]
        raise UserError(f"{first.where}: {first.message}" + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""))
    bad = {p.where: p.message for p in index.problems if p.blocking or p.kind == MISSING_CAPTION}
    settings = bucket_settings(cfg, resolution)
    samples = []
    for record in index.records:
        if record.rel in bad:
            continue
        reason = verify_image(record.path)
        if reason is not None:
            bad[record.rel] = reason
            continue
        size = upright_size(record.path)
        try:
            samples.append(ImageSample(record, file_sha256(record.path), size, place_image(*size, settings)))
        except ImageTooSmall as exc:
            bad[record.rel] = str(exc)
    if bad and report:
        print_bad_images(cfg, bad)
    if bad and not cfg.skip_bad_images:
        where, reason = next(iter(bad.items()))
        raise UserError(f"{len(bad)} bad image(s) in {cfg.train_data_dir} (first: {where}: {reason}); fix or remove them, or set skip_bad_images: true to train without them")
    if not samples:
        raise UserError(f"no usable images left in {cfg.train_data_dir}; run `lora-scripts check-data`")
    if bad and report:
        tqdm.write(f"skip_bad_images: skipped {len(bad)} bad image(s); training on {len(samples)}")
    return samples


def print_bad_images(cfg: TrainConfig, bad: dict[str, str]) -> None:
    """The bad images with their reasons, the first PROBLEMS_SHOWN of them."""
    tqdm.write(f"{cfg.train_data_dir}: {len(bad)} bad image(s):")
    for where, reason in list(bad.items())[:PROBLEMS_SHOWN]:
        tqdm.write(f"  {where}: {reason}")
    if len(bad) > PROBLEMS_SHOWN:
        tqdm.write(f"  ... and {len(bad) - PROBLEMS_SHOWN} more (lora-scripts check-data lists all)")


def augment_caption(caption: str, shuffle: bool, keep_tokens: int, dropout_rate: float) -> str:
    """kohya's caption handling: drop the whole caption with `dropout_rate`, else shuffle its
    comma-separated tags except the first `keep_tokens`."""
    if dropout_rate and float(torch.rand(())) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(kept + [rest[i] for i in torch.randperm(len(rest)).tolist()])


@dataclass
class ImageCollate:
    """Samples of one bucket -> a batch: latents (cached) or pixels, text-encoder outputs
    (cached) or token ids, and SDXL's size/crop conditioning."""

    cfg: TrainConfig
    tokenize: Callable[[list[str]], list[torch.Tensor]]
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None
    sdxl: bool

    def __call__(self, samples: list[ImageSample]) -> Batch:
        cfg = self.cfg
        captions = [augment_caption(s.record.caption, cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_dropout_rate) for s in samples]
        flips = [cfg.flip_aug and float(torch.rand(())) < 0.5 for _ in samples]
        crops = [s.placement.random_crop() if cfg.random_crop else s.placement.center_crop for s in samples]
        batch: Batch = {}
        if samples[0].latents is not None:
            batch["latents"] = torch.stack([s.latents_flipped if flip else s.latents for s, flip in zip(samples, flips)])
        else:
            batch["pixels"] = torch.stack([training_pixels(s.record.path, s.placement, crop, flip)
                                           for s, crop, flip in zip(samples, crops, flips)])
        if self.text_cache is not None:
            batch["prompt_embeds"] = torch.stack([self.text_cache[c][0] for c in captions])
            if self.sdxl:
                batch["pooled_prompt_embeds"] = torch.stack([self.text_cache[c][1] for c in captions])
        else:
            batch.update({f"input_ids_{i}": ids for i, ids in enumerate(self.tokenize(captions))})
        if self.sdxl:
            # SDXL micro-conditioning (Podell et al. 2023): original (h, w), crop (top, left), target (h, w)
            batch["time_ids"] = torch.tensor([[s.size[1], s.size[0], top, left, s.placement.bucket[1], s.placement.bucket[0]]
                                              for s, (left, top) in zip(samples, crops)], dtype=torch.float32)
        return batch


def count_images(batch: Batch) -> int:
    """Images in a batch (the loss unit and the throughput unit)."""
    return int((batch["latents"] if "latents" in batch else batch["pixels"]).shape[0])
