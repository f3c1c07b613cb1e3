"""Shared test helpers: write configs and data, run the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC_BASE_MODEL = "./models/Stable-diffusion/v1-5-pruned.safetensors"
# The spec's config, verbatim but for `base_model` (fill with .format(base_model=...)).
SPEC_CONFIG = """# configs/my_lora_config.yaml
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "{base_model}"
lora_rank: 8
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `lora-scripts ARGS` in a subprocess; returns the finished process (never raises).

    Torch runs on one thread (tiny models are far faster so on a busy 2-core machine); `env`
    adds or overrides variables.
    """
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts.cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def write_qa_jsonl(path: Path, n: int = 24) -> Path:
    """Question/answer rows in the spec's medical-QA shape."""
    rows = [{"question": f"{i} 加 {i} 等于几？", "answer": f"{i} 加 {i} 等于 {2 * i}。"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def write_config(path: Path, **keys) -> Path:
    """A YAML config with the given keys (paths written as strings)."""
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in keys.items()}, allow_unicode=True), encoding="utf-8")
    return path


def text_config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    """A small text-generation config on the tiny Llama and 24 QA rows."""
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    keys = dict(
        task_type="text-generation", base_model=str(model_dir), train_data_dir=str(data),
        prompt_template="问：{question}\n答：{answer}", output_dir=str(tmp_path / "out"),
        lora_rank=4, batch_size=4, epochs=1, learning_rate="2e-3", save_steps=0, logging_steps=1, seed=3,
    )
    keys.update(overrides)
    return write_config(tmp_path / "config.yaml", **keys)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below `folder`: type, and for files size and mtime (symlinks not followed).

    A folder's own mtime is left out: probing it for write access adds and removes a file.
    """
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        changes = () if path.is_dir() and not path.is_symlink() else (info.st_size, info.st_mtime_ns)
        found[path.relative_to(folder).as_posix()] = (info.st_mode, *changes)
    return found


def assert_refused_cleanly(results: list, cases: list[tuple[str, list[str], str]], root: Path, before: dict[str, tuple]) -> None:
    """Each (name, argv, expected text) case exited 2 with one `error:` line holding the text, and
    nothing under `root` changed since `before` (a `snapshot`)."""
    for (name, _, expect), result in zip(cases, results):
        stderr = result.stderr.strip()
        assert result.returncode == 2, (name, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expect in stderr, (name, stderr)
    assert snapshot(root) == before, "a refused command wrote files"
