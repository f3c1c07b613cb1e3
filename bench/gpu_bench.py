"""The text and image benchmarks on a GPU, random weights (nothing is downloaded), one command.

    .venv/bin/python bench/gpu_bench.py                  # a CUDA machine: ~10 min on one H200, refreshes BENCHMARKS.md
    .venv/bin/python bench/gpu_bench.py --quick --cpu    # tiny models on the CPU: checks the script's pieces work

Text: a Llama-3.2-1B-shaped model (SmolLM2's tokenizer) in bf16, lora-scripts against PEFT + HF
Trainer and a plain loop, on both text data sets: tokens/s, MFU against the bf16 matmul rate
measured in the same run, peak GPU memory, held-out loss. Image: an SD1.5-shaped pipeline at
512 px, lora-scripts against the diffusers-style loop: it/s, images/s, MFU, peak GPU memory,
step-1 loss on identical inputs. Exact resume: a text run killed after step 3 and resumed
against one never interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_image import QUICK_SOURCES, SOURCES, ImageBench, parity_line, source_groups  # noqa: E402
from bench.bench_image import results_table as image_table  # noqa: E402
from bench.bench_text import SMOLLM2, TextBench, prepare_data, row_specs, speedup_switches  # noqa: E402
from bench.bench_text import results_table as text_table  # noqa: E402
from bench.common import BENCHMARKS_FILE, REPO, machine_info, machine_line, matmul_peak, run_groups, run_in_workdir, write_section  # noqa: E402
from bench.image_rows import make_sd1_model, unet_step_flops  # noqa: E402
from bench.text_rows import matmul_params  # noqa: E402

# Llama-3.2-1B's shape (its config.json) with SmolLM2's 49,152-token vocabulary: ~1.1B parameters.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True)
PUBLISHED = ("Published figures for context (other hardware, not measured here): kohya sd-scripts / diffusers SD1.5 "
             "LoRA at 512 px ~1.7-3 it/s at batch 1 on an RTX 3090; unsloth reports ~2x HF Trainer's speed for LoRA.")


def make_llama(folder: Path, quick: bool, device: str, dtype: torch.dtype) -> Path:
    """The text model: the tests' tiny Llama (--quick) or a random Llama-3.2-1B-shaped one."""
    if quick:
        from tests.tiny_llm import make_tiny_llama

        return make_tiny_llama(folder)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_scripts.config import resolve_package_path
    from lora_scripts.models.llm import load_tokenizer

    tokenizer = load_tokenizer(resolve_package_path(SMOLLM2))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_exact_resume(folder: Path, data: Path, workdir: Path, precision: str, steps: int) -> dict[str, Any]:
    """Train `steps` steps straight; train again, SIGKILLed after step 3 (checkpoint at step 2),
    and resume; compare the two final LoRAs. Runs the CLI as a user would."""
    from safetensors.torch import load_file

    config = {"task_type": "text-generation", "base_model": str(folder), "train_data_dir": str(data), "lora_rank": 8,
              "batch_size": 4, "max_steps": steps, "save_steps": 2, "learning_rate": 1e-3, "seed": 0, "logging_steps": 1,
              "mixed_precision": "no" if precision == "fp32" else precision, "output_dir": str(workdir / "unused")}
    path = workdir / "resume.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def train(out: str, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(path), "--set", f"output_dir={workdir / out}", *extra]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**env, "LORA_SCRIPTS_FAULT": fault})

    runs = [train("straight"), train("resumed", fault="kill_after_step:3"), train("resumed", "--set", "resume=true")]
    codes = [run.returncode for run in runs]
    if codes != [0, -9, 0]:
        tail = "\n".join((runs[-1].stderr or runs[-1].stdout).strip().splitlines()[-5:])
        return {"error": f"exit codes {codes} (expected [0, -9, 0]): {tail}"}
    straight, resumed = (load_file(str(workdir / name / "adapter_model.safetensors")) for name in ("straight", "resumed"))
    worst = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    scale = max(float(t.float().abs().max()) for t in straight.values())
    identical = all(torch.equal(straight[k], resumed[k]) for k in straight)
    return {"max_abs_difference": worst, "largest_weight": scale, "bit_identical": identical, "tensors": len(straight)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps, rows in one process, no report unless --report")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (float32) instead of CUDA (bf16): only to check the script")
    parser.add_argument("--steps", type=int, help="text optimizer steps per row (default 20; --quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per row (default 2)")
    parser.add_argument("--report", type=Path, help=f"Markdown file whose GPU section is refreshed (default {BENCHMARKS_FILE.name}; --quick: none)")
    parser.add_argument("--workdir", type=Path, help="keep models, data and outputs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("error: gpu_bench.py needs a CUDA GPU and torch sees none; on this machine run "
              "`bench/gpu_bench.py --quick --cpu` to check the script, or bench/bench_text.py and bench/bench_image.py", file=sys.stderr)
        return 2
    return run_in_workdir(args, "gpu_bench_", run)


def run(args: argparse.Namespace, workdir: Path, report: Path | None) -> int:
    """Text rows, image rows, the resume check; print and write the GPU section."""
    from lora_scripts.models.llm import load_tokenizer

    device, precision = ("cpu", "fp32") if args.cpu else ("cuda", "bf16")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    memory_key = "peak_rss_mib" if args.cpu else "peak_device_mib"
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info))
    side = 256 if args.quick else 8192
    peak, shape = matmul_peak([(side, side, side), (side // 2, side, side * 2)], dtype, device)
    print(f"{dtype} matmul peak: {peak / 1e12:.2f} TFLOP/s ({shape})")

    (workdir / "text").mkdir(exist_ok=True)
    folder = make_llama(workdir / "llama", args.quick, device, dtype)
    bench = TextBench(workdir / "text", folder, str(folder), args.steps or (2 if args.quick else 20), args.threads,
                      isolate=not args.quick, device=device, precision=precision, env={"LORA_SCRIPTS_CACHE": str(workdir / "cache")})
    data = prepare_data(bench, load_tokenizer(str(folder)), held_out=4 if args.quick else 16, longest=128 if args.quick else 512)
    params = matmul_params(folder, bench.rank)
    flops_per_token = 6 * (params["base"] + params["lora"])
    data = data[-1:] if args.quick else data  # --quick checks the pieces: the long-tail set is enough
    text_groups = [(d, row_specs(bench, d, speedup_switches()[0])) for d in data]
    if args.quick:  # and baseline A against lora-scripts' defaults (bench_text.py --quick runs the other rows)
        text_groups = [(d, specs[:1] + specs[2:3]) for d, specs in text_groups]

    (workdir / "image").mkdir(exist_ok=True)
    if args.quick:
        from tests.tiny_sd import make_tiny_sd

        model = make_tiny_sd(workdir / "image", "sd1").diffusers_dir
    else:
        model = make_sd1_model(workdir / "image" / "sd15", 1)
    image = ImageBench(workdir / "image", model, 64 if args.quick else 512, 4 if args.quick else 32, args.threads,
                       isolate=not args.quick, device=device, precision=precision, bucket_steps=16 if args.quick else None)
    image_groups = source_groups(image, dict(list(QUICK_SOURCES.items())[:1]) if args.quick else SOURCES)
    results = run_groups(text_groups + image_groups, not args.quick, bench.env)
    text_results, image_results = results[: len(text_groups)], results[len(text_groups) :]
    flops_per_image = unet_step_flops(model, image.resolution, image.batch, device, dtype) / image.batch

    resume = check_exact_resume(folder, data[-1].train_jsonl, workdir, precision, 4 if args.quick else 6)
    failed = "error" in resume or any("error" in r for _, rows in results for r in rows)
    text = _report(args, info, peak, shape, params, flops_per_token, text_results, image, image_results, flops_per_image, resume, memory_key)
    print("\n" + text)
    if report is not None:
        write_section(report, "gpu" if not args.quick else "gpu-quick", text)
        print(f"\nwrote the GPU section of {report}")
    return 1 if failed else 0


def _report(args, info, peak, shape, params, flops_per_token, text_results, image, image_results, flops_per_image, resume, memory_key) -> str:
    """The GPU section of BENCHMARKS.md."""
    precision = "float32 on the CPU" if args.cpu else "bf16 autocast, LoRA weights in float32"
    lines = [
        "## On a GPU (`bench/gpu_bench.py`)", "",
        f"Command: `.venv/bin/python bench/gpu_bench.py{' --quick --cpu' if args.quick else ''}`. {machine_line(info)} Precision: {precision}.",
        f"Matmul peak measured in this run: {peak / 1e12:.2f} TFLOP/s ({shape}). {PUBLISHED}", "",
        f"### Text: {'tiny random Llama' if args.quick else 'Llama-3.2-1B-shaped, random weights'} ({params['base']:,} matmul weights)", "",
        f"Model FLOPs = 6·N·T (N = {params['base'] + params['lora']:,}, every Linear incl. the LM head plus LoRA; T = useful tokens); "
        f"the percentage is MFU against the matmul peak above.",
    ]
    for dataset, results in text_results:
        lines += ["", f"{dataset.title}: {dataset.summary}.", "", text_table(results, flops_per_token, peak, memory_key)]
    lines += ["", f"### Image: SD1.5-shaped pipeline, random weights, resolution {image.resolution}, batch {image.batch}", "",
              f"UNet training FLOPs per image ({flops_per_image / 1e9:.0f} GFLOP, forward + backward with LoRA, counted by "
              f"torch's FlopCounterMode at {image.resolution}x{image.resolution}); it/s = images/s / {image.batch}."]
    for label, results in image_results:
        timed, check = results[:-1], results[-1]
        mfu = "; ".join(f"{r['name'].split(': ', 1)[1]}: {r['images_per_s'] / image.batch:.2f} it/s, MFU "
                        f"{100 * flops_per_image * r['images_per_s'] / peak:.1f}%" for r in timed if "error" not in r)
        lines += ["", f"Source pictures {label}:", "", image_table(timed, memory_key), "", mfu + ".", "", parity_line(check)]
    if "error" in resume:
        lines += ["", f"Exact resume failed: {resume['error']}"]
    else:
        lines += ["", f"Exact resume (text, killed after step 3, resumed from step 2's checkpoint): final LoRA "
                      f"({resume['tensors']} tensors) max |difference| {resume['max_abs_difference']:.2e} against an uninterrupted "
                      f"run (largest weight {resume['largest_weight']:.2e}); bit-identical: {'yes' if resume['bit_identical'] else 'no'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
