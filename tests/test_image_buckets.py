"""Aspect-ratio buckets: never upscale, sides on the grid, batches from one bucket, kohya's list."""

from __future__ import annotations

import random

import pytest

from lora_scripts.data.image_buckets import BucketSettings, ImageTooSmall, bucket_batcher, bucket_resolutions, place_image


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(n)]


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_no_upscale_buckets_never_enlarge_and_stay_on_the_grid(resolution):
    settings = BucketSettings(resolution)
    placed = 0
    for width, height in random_sizes(5000):
        try:
            placement = place_image(width, height, settings)
        except ImageTooSmall as exc:
            assert min(width, height) < 64 or width * height > resolution**2, (width, height)
            assert "bucket_reso_steps 64" in str(exc)
            continue
        placed += 1
        bucket_w, bucket_h = placement.bucket
        resized_w, resized_h = placement.resized
        assert bucket_w % 64 == 0 and bucket_h % 64 == 0 and bucket_w > 0 and bucket_h > 0
        assert bucket_w * bucket_h <= resolution**2
        assert resized_w <= width and resized_h <= height  # never upscaled
        assert resized_w >= bucket_w and resized_h >= bucket_h  # covers the bucket: crop only
        # the resize keeps the aspect ratio (to the rounding of one pixel)
        assert abs(resized_w / resized_h - width / height) <= width / height * (1 / resized_h + 1 / resized_w) + 1e-9
    assert placed > 4500


def test_small_and_odd_images():
    settings = BucketSettings(512)
    small = place_image(300, 200, settings)  # under 512^2: cut to the grid, scaled down only to crop less
    assert small.bucket == (256, 192) and small.resized == (288, 192) and small.center_crop == (16, 0)
    assert place_image(2048, 2048, settings).bucket == (512, 512)
    assert place_image(4000, 1000, settings).bucket == (1024, 256)
    with pytest.raises(ImageTooSmall):
        place_image(50, 500, settings)
    square = BucketSettings(512, enabled=False)
    assert place_image(1024, 768, square).bucket == (512, 512)
    assert place_image(1024, 768, square).resized == (683, 512)
    with pytest.raises(ImageTooSmall, match="smaller than resolution 512"):
        place_image(511, 900, square)
    assert place_image(256, 256, BucketSettings(512, enabled=False, no_upscale=False)).resized == (512, 512)


def test_upscale_mode_uses_kohyas_bucket_list():
    # kohya-ss sd-scripts model_util.make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert bucket_resolutions(512, 256, 1024, 64) == sorted({
        (512, 512), (256, 1024), (1024, 256), (320, 768), (768, 320), (384, 640), (640, 384), (448, 576),
        (576, 448), (704, 320), (320, 704), (832, 256), (256, 832), (896, 256), (256, 896), (960, 256), (256, 960),
    })
    settings = BucketSettings(512, no_upscale=False, min_side=256, max_side=1024)
    placement = place_image(100, 160, settings)  # aspect 0.625: the 384x640 bucket (0.6)
    assert placement.bucket == (384, 640) and placement.resized == (400, 640)


def test_batches_never_mix_buckets_and_repeat_images():
    buckets = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)]
    repeats = [1, 1, 1, 1, 2, 1, 1, 3, 10]
    batcher = bucket_batcher(buckets, repeats, batch_size=2, seed=7)
    counts = set()
    for epoch in range(4):
        batches = batcher(epoch)
        counts.add(len(batches))
        for batch in batches:
            assert len({buckets[i] for i in batch}) == 1
        flat = sorted(i for batch in batches for i in batch)
        assert flat == sorted(i for i, n in enumerate(repeats) for _ in range(n))
    assert counts == {3 + 3 + 5}  # ceil(6/2) + ceil(5/2) + ceil(10/2), the same every epoch
    assert batcher(1) == bucket_batcher(buckets, repeats, 2, 7)(1)
    assert batcher(1) != batcher(2)
