"""Image LoRA training speed: lora-scripts against a loop written like diffusers' train_text_to_image_lora.py.

    .venv/bin/python bench/bench_image.py            # the measurement, refreshes BENCHMARKS.md
    .venv/bin/python bench/bench_image.py --quick    # the tests' tiny SD at 64 px: checks the script works

Both train the same PEFT LoRA on the same random-weight SD1.5-shaped model (every width divided
by --width-divisor so it fits 2 cores) from the same JPEGs, two epochs of batch 4, each row in a
fresh process; images/s is measured over epoch 2. Source pictures phone-sized (4032x3024) and
small (768x512). A separate check runs step 1 of both on identical inputs and compares the losses.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCHMARKS_FILE, machine_info, machine_line, markdown_table, ratio, run_groups, run_in_workdir, write_section  # noqa: E402
from bench.image_rows import make_sd1_model, write_photos  # noqa: E402

SOURCES = {"phone-sized 4032x3024": (4032, 3024), "small 768x512": (768, 512)}
QUICK_SOURCES = {"phone-sized 1008x756 (quick)": (1008, 756), "small 96x64 (quick)": (96, 64)}
EPOCHS = 2  # the first fills lora-scripts' caches; the second is measured


@dataclass
class ImageBench:
    """What every row of one image benchmark shares."""

    workdir: Path
    model: Path  # diffusers folder
    resolution: int
    images: int
    threads: int
    batch: int = 4
    isolate: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    bucket_steps: int | None = None  # None: lora-scripts' default


def lora_scripts_config(bench: ImageBench, key: str, data: Path) -> Path:
    """The YAML lora-scripts trains from: the keys the comparison fixes; the rest default."""
    config = {
        "task_type": "image", "base_model": str(bench.model), "train_data_dir": str(data), "output_dir": str(bench.workdir / "unused"),
        "resolution": bench.resolution, "lora_rank": 8, "lora_alpha": 8, "batch_size": bench.batch, "epochs": EPOCHS,
        "learning_rate": 1e-4, "lr_scheduler": "constant", "save_steps": 0, "seed": 0,
        "mixed_precision": "no" if bench.precision == "fp32" else bench.precision,
    }
    if bench.bucket_steps:
        config["bucket_reso_steps"] = bench.bucket_steps
    path = bench.workdir / f"{key}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def row_specs(bench: ImageBench, key: str, data: Path) -> list[dict[str, Any]]:
    """Baseline, lora-scripts, lora-scripts without the latent cache or fused LoRA layers, and the
    step-1 check (always float32: it compares numbers, not speed)."""
    config = lora_scripts_config(bench, key, data)
    common = {"model": str(bench.model), "data": str(data), "config": str(config), "resolution": bench.resolution,
              "batch": bench.batch, "epochs": EPOCHS, "lr": 1e-4, "rank": 8, "seed": 0, "threads": bench.threads,
              "device": bench.device, "precision": bench.precision}
    rows = [("diffusers-style loop", "image_diffusers", []), ("lora-scripts (defaults)", "image_lora_scripts", []),
            ("lora-scripts, cache_latents off", "image_lora_scripts", ["cache_latents=false"]),
            ("lora-scripts, fused_lora off", "image_lora_scripts", ["fused_lora=false"]),
            ("step-1 loss check", "image_parity", ["mixed_precision='no'"])]
    specs = [{**common, "name": f"{key}: {label}", "kind": kind, "overrides": [*extra, f"output_dir={bench.workdir / f'{key}-{i}'}"]}
             for i, (label, kind, extra) in enumerate(rows)]
    specs[-1]["precision"] = "fp32"
    return specs


def source_groups(bench: ImageBench, sources: dict[str, tuple[int, int]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Write the pictures of each source size; (label, its row specs) per source."""
    groups = []
    for index, (label, size) in enumerate(sources.items()):
        data = write_photos(bench.workdir / f"photos_src{index}", bench.images, size)
        groups.append((label, row_specs(bench, f"src{index}", data)))
        print(f"{label}: {bench.images} JPEGs")
    return groups


def results_table(results: list[dict[str, Any]], memory_key: str = "peak_rss_mib") -> str:
    """One source size's timed rows, with ratios against the first (the baseline)."""
    base, rows = results[0], []
    for r in results:
        label = r["name"].split(": ", 1)[1]
        if "error" in r:
            rows.append([label, f"failed: {r['error'].strip().splitlines()[-1][:120]}"] + ["–"] * 7)
            continue
        rows.append([label, f"{r['images_per_s']:.2f}", ratio(r["images_per_s"], base.get("images_per_s")),
                     f"{r['images_per_cpu_s']:.2f} ({ratio(r['images_per_cpu_s'], base.get('images_per_cpu_s'))})",
                     f"{r['s_per_step']:.2f}", f"{100 * r['data_share']:.1f}%", f"{r[memory_key]:.0f}",
                     ratio(r[memory_key], base.get(memory_key)), f"{r['first_step_done_s']:.1f}"])
    memory = "peak RSS MiB" if memory_key == "peak_rss_mib" else "peak GPU MiB"
    headers = ["row", "images/s (epoch 2)", "vs baseline", "per CPU-second (vs baseline)", "s/step", "data+loop share", memory, "vs baseline", "first step done, s"]
    return markdown_table(headers, rows)


def parity_line(check: dict[str, Any]) -> str:
    """The step-1 check as one sentence."""
    if "error" in check:
        return f"Step-1 loss check failed: {check['error'].strip().splitlines()[-1]}"
    return (f"Step 1 on identical inputs (bucket {check['bucket'][0]}x{check['bucket'][1]}): loss {check['loss_lora_scripts']:.7f} "
            f"(lora-scripts) vs {check['loss_baseline']:.7f} (baseline), relative difference {check['relative_difference']:.1e}; "
            f"cached latents vs the baseline's VAE max |diff| {check['latents_max_difference']:.1e}, cached text-encoder "
            f"outputs vs its encoder {check['text_max_difference']:.1e}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny SD at 64 px, 4 images, rows in one process, no report unless --report")
    parser.add_argument("--images", type=int, help="pictures per source size (default 32; --quick 4)")
    parser.add_argument("--resolution", type=int, help="training resolution (default 256; --quick 64)")
    parser.add_argument("--width-divisor", type=int, default=8, help="SD1.5's channel widths divided by this (default 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per row (default 2)")
    parser.add_argument("--report", type=Path, help=f"Markdown file whose image section is refreshed (default {BENCHMARKS_FILE.name}; --quick: none)")
    parser.add_argument("--workdir", type=Path, help="keep model, pictures and outputs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    args.images = args.images or (4 if args.quick else 32)
    args.resolution = args.resolution or (64 if args.quick else 256)
    return run_in_workdir(args, "bench_image_", run)


def run(args: argparse.Namespace, workdir: Path, report: Path | None) -> int:
    """Build the model and pictures, run the rows, print the tables and write the report."""
    info = machine_info()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{machine_line(info)}\nuptime: {uptime_start}")
    if args.quick:
        from tests.tiny_sd import make_tiny_sd

        model, title = make_tiny_sd(workdir, "sd1").diffusers_dir, "the tests' tiny random SD1 (tests/tiny_sd.py)"
    else:
        model = make_sd1_model(workdir / "sd1_model", args.width_divisor)
        title = (f"SD1.5-shaped, random weights, every channel width / {args.width_divisor} (UNet, VAE and CLIP text "
                 f"encoder keep SD1.5's depth, block types, head size and 8x VAE downsampling)")
    bench = ImageBench(workdir, model, args.resolution, args.images, args.threads, args.batch, isolate=not args.quick,
                       bucket_steps=16 if args.quick else None)  # --quick: small pictures need small bucket steps
    sections = run_groups(source_groups(bench, QUICK_SOURCES if args.quick else SOURCES), bench.isolate)
    failed = any("error" in r for _, results in sections for r in results)
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    torch_threads = f"torch on {args.threads} threads"
    command = "bench/bench_image.py" + (" --quick" if args.quick else "")
    lines = [
        "## Image LoRA on CPU (`bench/bench_image.py`)", "",
        f"Command: `.venv/bin/python {command}` ({args.images} pictures per source size, resolution {args.resolution}, "
        f"batch {args.batch}, {EPOCHS} epochs, {torch_threads}, each row in a fresh process). {machine_line(info)}",
        f"`uptime` before: `{uptime_start}`; after: `{uptime_end}`.", "",
        f"Model: {title}. LoRA r=8 on kohya's UNet modules (both loops), AdamW lr 1e-4 constant, float32.",
        "Baseline: a loop written like diffusers' `train_text_to_image_lora.py`: each step decodes the JPEGs, resizes "
        "(bilinear, shorter side) and centre-crops a resolution-sized square, runs the VAE (`latent_dist.sample()`) and "
        "the text encoder, then the UNet. lora-scripts: `train(load_config(...))` with its defaults (latents and "
        "text-encoder outputs cached at start-up, aspect-ratio buckets of about resolution² pixels, LoRA layers "
        "computed with their merged weights).",
    ]
    for label, results in sections:
        timed, check = results[:-1], results[-1]
        lines += ["", f"### Source pictures {label}", "", results_table(timed), "", parity_line(check)]
    lines += ["", _COLUMNS]
    text = "\n".join(lines)
    print("\n" + text)
    if report is not None:
        write_section(report, "image-cpu" if not args.quick else "image-quick", text)
        print(f"\nwrote the image section of {report}")
    return 1 if failed else 0


_COLUMNS = """Columns: *images/s (epoch 2)* is the pictures of one epoch over the time from the end of
epoch 1's last optimizer step to the end of epoch 2's; *per CPU-second* divides them by the
process's CPU time (all threads) over that span instead, which a busy shared machine disturbs much
less; *data+loop share* is the time between an
optimizer step's end and the next module call (decoding, resizing, collation, bookkeeping) over
epoch 2; *peak RSS* is the row's process (`ru_maxrss`); *first step done* is from starting the
row's process to the end of its first optimizer step (lora-scripts fills its caches before it).
The step-1 check seeds torch (`torch.manual_seed(0)`) right before each loss, so noise and
timesteps are the same draws; the baseline gets lora-scripts' LoRA weights and encodes the
same bucket crop with the VAE's posterior mean (lora-scripts caches the mean; the script samples),
made contiguous (the VAE returns channels-last latents, and `torch.randn_like` follows the memory
layout, so the same seed gives differently placed noise for another layout)."""


if __name__ == "__main__":
    sys.exit(main())
