"""What latent caching buys: epoch 1 (which fills the caches) against epoch 2 on a tiny SD1.5-shaped
model, plus an uncached run for reference, and the process's peak memory.

    .venv/bin/python bench/bench_image_cache.py [--images 16] [--size 4032x3024] [--resolution 64]

The data are camera-sized JPEGs (the guide asks for >= 512 px; photos are larger), so epoch 1
pays what real runs pay once: decoding and downscaling every photo and encoding it with the
VAE and the text encoder. The tiny UNet is cheap, so this measures the data side of a step.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_scripts.config import TrainConfig, validate_config  # noqa: E402
from lora_scripts.loop import backward_group  # noqa: E402
from lora_scripts.tasks import image as image_task  # noqa: E402
from tests.tiny_sd import make_tiny_sd  # noqa: E402


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Smooth random JPEG pictures with a metadata.csv."""
    folder.mkdir(parents=True)
    rows = ["filename,prompt"]
    for i in range(count):
        coarse = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:03d}.jpg", quality=90)
        rows.append(f'{i:03d}.jpg,"ink wash painting, scene {i}"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def timed(store: dict[str, float], name: str, function: Callable) -> Callable:
    """`function`, adding its run time to store[name]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def run_epochs(cfg: TrainConfig, epochs: int) -> tuple[dict[str, float], list[float]]:
    """Build the image task and train `epochs` epochs as the loop does; (cache timings, epoch times)."""
    cache_times: dict[str, float] = {}
    originals = image_task.cache_latents, image_task.cache_text_outputs
    image_task.cache_latents = timed(cache_times, "latents", originals[0])
    image_task.cache_text_outputs = timed(cache_times, "text", originals[1])
    try:
        task = image_task.build_image_task(cfg, "cpu")
    finally:
        image_task.cache_latents, image_task.cache_text_outputs = originals
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(task.param_groups, lr=cfg.learning_rate)
    task.model.train()
    epoch_times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for indices in task.batcher(epoch):
            backward_group(task.model, task, [task.collate([task.train_set[i] for i in indices])], accelerator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        epoch_times.append(time.perf_counter() - start)
    return cache_times, epoch_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="4032x3024", help="source photo size WxH")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--bucket-steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny_sd(root, "sd1")
        write_photos(root / "data", args.images, (width, height))
        keys = dict(base_model=str(tiny.diffusers_dir), train_data_dir=str(root / "data"), output_dir=str(root / "out"),
                    resolution=args.resolution, bucket_reso_steps=args.bucket_steps, batch_size=args.batch_size)
        runs = [run_epochs(validate_config(keys), 2) for _ in range(args.repeats)]
        uncached = min(min(run_epochs(validate_config({**keys, "cache_latents": False}), 2)[1]) for _ in range(args.repeats))
    # the machine may be shared: the fastest of the repeats is the least disturbed
    fill = min(sum(times.values()) for times, _ in runs)
    first_steps, later = min(epochs[0] for _, epochs in runs), min(epochs[1] for _, epochs in runs)
    epoch1 = fill + first_steps
    print(f"tiny sd1, {args.images} JPEGs {width}x{height}, resolution {args.resolution}, batch {args.batch_size}, "
          f"{args.threads} thread(s), fastest of {args.repeats}")
    print(f"cached:   epoch 1 {epoch1:.2f} s (caches {fill:.2f} s + steps {first_steps:.2f} s), epoch 2 {later:.2f} s")
    print(f"uncached: an epoch {uncached:.2f} s")
    print(f"ratio epoch 1 / epoch 2 with caching: {epoch1 / later:.2f}x")
    print(f"ratio uncached epoch / cached epoch: {uncached / later:.2f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
