"""The benchmark scripts keep working: each runs in its smallest mode on the tests' tiny models
(`--quick`), and the section it writes into a report file holds sane numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from bench.bench_text import CANDIDATE_SWITCHES
from lora_scripts.config import TrainConfig
from tests.helpers import REPO


def run_bench(script: str, report: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bench/SCRIPT --quick --threads 1 --report REPORT ARGS` as a user would run it."""
    return subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--threads", "1", "--report", str(report), *args],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def why(proc: subprocess.CompletedProcess) -> str:
    """The failed rows and the end of stderr, for an assertion message."""
    failed = [line for line in proc.stdout.splitlines() if "failed" in line or "error" in line.lower()]
    return "\n".join(failed[:20]) + "\n" + proc.stderr[-2000:]


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The first Markdown table after `heading`: row label -> cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_text_bench_quick(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    proc = run_bench("bench_text.py", report)
    assert proc.returncode == 0, why(proc)
    text = report.read_text(encoding="utf-8")
    assert "<!-- text-quick: begin" in text and "<!-- text-quick: end -->" in text
    switches = [k for k in CANDIDATE_SWITCHES if TrainConfig.model_fields.get(k) is not None and TrainConfig.model_fields[k].default is True]
    expected = {"A: PEFT + HF Trainer", "B: plain PyTorch loop", "lora-scripts (defaults)"} | {f"lora-scripts, {k} off" for k in switches}
    for heading in ("### Demo JSON-extraction set", "### Long-tail chat set"):
        rows = table_rows(text, heading)
        assert set(rows) == expected
        losses = [float(cells[8]) for cells in rows.values()]
        for cells in rows.values():
            assert float(cells[0]) > 0 and float(cells[4]) > 0  # tokens/s, peak RSS
        # two steps of a tiny random model barely move its loss: every row lands close to baseline A
        assert all(math.isfinite(x) and abs(x - losses[0]) < 0.02 for x in losses), losses
        assert rows["A: PEFT + HF Trainer"][1] == "1.00×"


def test_image_bench_quick(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    proc = run_bench("bench_image.py", report)
    assert proc.returncode == 0, why(proc)
    text = report.read_text(encoding="utf-8")
    for source in ("phone-sized", "small"):
        rows = table_rows(text, f"### Source pictures {source}")
        assert set(rows) == {"diffusers-style loop", "lora-scripts (defaults)", "lora-scripts, cache_latents off", "lora-scripts, fused_lora off"}
        assert all(float(cells[0]) > 0 for cells in rows.values())
    # identical inputs give the identical step-1 loss (float32, same seed)
    checks = [line for line in text.splitlines() if line.startswith("Step 1 on identical inputs")]
    assert len(checks) == 2 and all("relative difference 0.0e+00" in line for line in checks), checks


def test_gpu_bench_refuses_without_cuda(tmp_path):
    proc = run_bench("gpu_bench.py", tmp_path / "BENCHMARKS.md", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "error: gpu_bench.py needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_gpu_bench_quick_on_cpu(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nkept text\n", encoding="utf-8")
    proc = run_bench("gpu_bench.py", report, "--cpu")
    assert proc.returncode == 0, why(proc)
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nkept text\n")  # the other sections stay
    assert "tokens/s" in text and "MFU" in text
    assert "bit-identical: yes" in text  # a killed and resumed CPU run ends exactly where an uninterrupted one does
    assert "relative difference 0.0e+00" in text
