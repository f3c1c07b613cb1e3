"""Aspect-ratio buckets: the size each image trains at, and micro-batches drawn from one bucket.

Follows kohya-ss sd-scripts (`library/model_util.py` make_bucket_resolutions,
`library/train_util.py` BucketManager): an image is resized keeping its aspect ratio until it
covers its bucket, then cropped to it. Two ways to pick the bucket:

- no upscale (default): the image is scaled down to at most resolution^2 pixels and each side is
  cut down to a multiple of `steps`. Unlike kohya, which rounds to the nearest multiple and so can
  enlarge a side by a few pixels, sides are only ever rounded down: an image is never upscaled.
- upscale: kohya's fixed list of buckets of area <= resolution^2 between `min_side` and `max_side`;
  the one closest in aspect ratio wins and the image is scaled (up if needed) to cover it.

Without bucketing every image goes to a resolution x resolution square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from lora_scripts.schedule import Batcher

Size = tuple[int, int]  # (width, height)


class ImageTooSmall(Exception):
    """The image cannot be placed in a bucket without being enlarged; str() says why."""


@dataclass(frozen=True)
class BucketSettings:
    """How images are sized for training (the config's resolution and bucket keys)."""

    resolution: int
    steps: int = 64
    enabled: bool = True
    no_upscale: bool = True
    min_side: int | None = None  # upscale mode only; default resolution / 2
    max_side: int | None = None  # upscale mode only; default resolution * 2

    @cached_property
    def predefined(self) -> list[Size]:
        """kohya's bucket list for upscale mode."""
        min_side = self.min_side or self.resolution // 2
        max_side = self.max_side or self.resolution * 2
        return bucket_resolutions(self.resolution, min_side, max_side, self.steps)


@dataclass(frozen=True)
class Placement:
    """An image resized (aspect kept) to `resized`, which covers `bucket`, then cropped to it."""

    bucket: Size
    resized: Size

    @property
    def center_crop(self) -> tuple[int, int]:
        """(left, top) of the centred crop."""
        return (self.resized[0] - self.bucket[0]) // 2, (self.resized[1] - self.bucket[1]) // 2

    def random_crop(self) -> tuple[int, int]:
        """(left, top) of a crop drawn from torch's global RNG (restored exactly on resume)."""
        left = int(torch.randint(0, self.resized[0] - self.bucket[0] + 1, ()))
        top = int(torch.randint(0, self.resized[1] - self.bucket[1] + 1, ()))
        return left, top


def bucket_resolutions(resolution: int, min_side: int, max_side: int, steps: int) -> list[Size]:
    """kohya's make_bucket_resolutions: the square plus every (w, h) with sides in
    [min_side, max_side], multiples of `steps`, and area <= resolution^2 (both orientations)."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // steps) * steps
    sizes = {(side, side)}
    width = min_side
    while width <= max_side:
        height = min(max_side, int((max_area // width) // steps) * steps)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
        width += steps
    return sorted(sizes)


def place_image(width: int, height: int, settings: BucketSettings) -> Placement:
    """Where an image of `width` x `height` trains. Raises ImageTooSmall when placing it would
    need upscaling that `no_upscale` forbids."""
    if not settings.enabled:
        side = settings.resolution
        if settings.no_upscale and (width < side or height < side):
            raise ImageTooSmall(f"{width}x{height} is smaller than resolution {side} (enable_bucket or bucket_no_upscale: false)")
        return _cover(width, height, (side, side))
    if settings.no_upscale:
        scale = min(1.0, math.sqrt(settings.resolution**2 / (width * height)))
        bucket = (_floor_to(width * scale, settings.steps), _floor_to(height * scale, settings.steps))
        if 0 in bucket:
            raise ImageTooSmall(f"{width}x{height} has a side under bucket_reso_steps {settings.steps} px")
        return _cover(width, height, bucket)
    aspect = width / height
    bucket = min(settings.predefined, key=lambda size: abs(size[0] / size[1] - aspect))
    return _cover(width, height, bucket)


def _floor_to(value: float, steps: int) -> int:
    return int(value // steps) * steps


def _cover(width: int, height: int, bucket: Size) -> Placement:
    """The smallest aspect-keeping resize of the image that covers `bucket`."""
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return Placement(bucket, resized)


def bucket_batcher(buckets: Sequence[Size], repeats: Sequence[int], batch_size: int, seed: int) -> Batcher:
    """Micro-batches that never mix buckets, each image `repeats` times per epoch (kohya's
    `N_name` folders). Shuffled within and across buckets from (seed, epoch) alone; every epoch
    has the same number of micro-batches."""
    members: dict[Size, list[int]] = {}
    for index, (bucket, count) in enumerate(zip(buckets, repeats)):
        members.setdefault(bucket, []).extend([index] * count)

    def batches(epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        chunks = []
        for bucket in sorted(members):
            order = [members[bucket][i] for i in torch.randperm(len(members[bucket]), generator=generator).tolist()]
            chunks += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]

    return batches
