"""Nothing trained is lost: SIGKILL at any point and a resume give the uninterrupted run's
weights bit for bit (CPU, float32); SIGINT/SIGTERM stop cleanly; NaN, out-of-memory and a full
disk stop with a clear message and the last good checkpoint intact.

Faults are injected with LORA_SCRIPTS_FAULT (lora_scripts/faults.py). Every run here has 12
optimizer steps of 2 micro-batches, a checkpoint every 2 steps and save_total_limit: 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts.checkpoint import list_checkpoints, load_checkpoint
from lora_scripts.cli import main
from tests.forkserver import Finished, ForkServer
from tests.helpers import REPO, text_config

# 24 rows, micro-batches of 2, 2 per step: 6 steps per epoch, 12 in all.
TEXT_KEYS = dict(batch_size=2, gradient_accumulation_steps=2, epochs=2, save_steps=2, save_total_limit=2,
                 lora_dropout=0.1, logging_steps=1)
# 6 images, micro-batches of 1, 2 per step: 3 steps per epoch, 12 in all.
IMAGE_KEYS = dict(batch_size=1, gradient_accumulation_steps=2, epochs=4, save_steps=2, save_total_limit=2,
                  lr_scheduler="cosine")
TOTAL_STEPS = 12
SIGKILLED = -signal.SIGKILL
MAX_DIFFERENCE: dict[str, float] = {}  # largest weight difference seen per test, printed at the end


class Runs:
    """Runs of one task: configs in fresh folders, training through a fork server, and the
    uninterrupted reference runs."""

    def __init__(self, task: str, root: Path, model: Path, server: ForkServer) -> None:
        self.task, self.root, self.model, self.server = task, root, model, server
        self._count = 0
        self._references: dict[str, Path] = {}

    def train(self, config: Path, *overrides: str, fault: str = "") -> Finished:
        """`lora-scripts train --config CONFIG --set …` with LORA_SCRIPTS_FAULT=fault."""
        args = [arg for item in overrides for arg in ("--set", item)]
        return self.server.run("train", "--config", str(config), *args, env={"LORA_SCRIPTS_FAULT": fault})

    def config(self, **keys) -> Path:
        """A config in a new folder; its output_dir is `<folder>/out`."""
        self._count += 1
        folder = self.root / f"run{self._count}"
        folder.mkdir()
        if self.task == "text":
            return text_config(folder, self.model, **{**TEXT_KEYS, **keys})
        from tests.image_helpers import image_config, write_dataset

        write_dataset(folder / "data", [(32, 32)] * 6)
        return image_config(folder, self.model, **{**IMAGE_KEYS, **keys})

    def reference_config(self, **keys) -> Path:
        """The config of an uninterrupted run with these keys, trained on first use."""
        name = repr(sorted(keys.items()))
        if name not in self._references:
            config = self.config(**keys)
            finished(self.train(config))
            self._references[name] = config
        return self._references[name]

    def reference(self, **keys) -> dict[str, torch.Tensor]:
        """Final weights of the uninterrupted run with these keys."""
        return final_weights(self.reference_config(**keys))


def finished(proc: Finished) -> Finished:
    """Assert a run ended well."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def out_dir(config: Path) -> Path:
    return config.parent / "out"


def final_weights(config: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final LoRA file(s) in output_dir."""
    files = sorted(out_dir(config).glob("*.safetensors"))
    assert files, f"no final LoRA in {out_dir(config)}"
    return {f"{file.name}:{key}": value for file in files for key, value in load_file(file).items()}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str, atol: float = 0.0) -> None:
    """Same tensors; bit-identical when atol is 0. Records the largest difference."""
    assert got.keys() == want.keys()
    difference = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    MAX_DIFFERENCE[label] = difference
    if atol == 0.0:
        assert all(torch.equal(got[k], want[k]) for k in want), f"{label}: largest difference {difference:.3g}"
    assert difference <= atol, f"{label}: largest difference {difference:.3g}"
    assert max(float(v.abs().max()) for v in want.values()) > 0  # the LoRA did train


def step_names(config: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out_dir(config))]


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory, tiny_llm_dir) -> Runs:
    server = ForkServer(["lora_scripts.tasks.text"], tmp_path_factory.mktemp("text_server"))
    yield Runs("text", tmp_path_factory.mktemp("text_runs"), tiny_llm_dir, server)
    server.close()


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory) -> Runs:
    from tests.tiny_sd import make_tiny_sd

    root = tmp_path_factory.mktemp("image_runs")
    server = ForkServer(["lora_scripts.tasks.image"], tmp_path_factory.mktemp("image_server"))
    yield Runs("image", root, make_tiny_sd(root, "sd1").diffusers_dir, server)
    server.close()


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    if MAX_DIFFERENCE:
        print("\nlargest weight difference against the uninterrupted run:",
              ", ".join(f"{k}: {v:.3g}" for k, v in MAX_DIFFERENCE.items()), file=sys.stderr)


@pytest.mark.parametrize("task", ["text", "image"])
def test_sigkill_anywhere_then_resume_gives_identical_weights(task, request):
    runs: Runs = request.getfixturevalue(f"{task}_runs")
    reference = runs.reference()
    config = runs.config()

    # Mid-epoch, right after optimizer step 5: the newest checkpoint is step_4.
    proc = runs.train(config, fault="kill_after_step:5")
    assert proc.returncode == SIGKILLED, proc.stderr[-2000:]
    assert step_names(config) == ["step_2", "step_4"]
    assert not list(out_dir(config).glob("*.safetensors"))  # no final LoRA from a killed run

    # Mid-accumulation: after the first of step 7's two micro-batches (step_6 was saved).
    proc = runs.train(config, "resume=true", fault="kill_mid_accumulation:7")
    assert proc.returncode == SIGKILLED, proc.stderr[-2000:]
    assert f"resumed from {out_dir(config) / 'step_4'} at step 4" in proc.stdout
    assert step_names(config) == ["step_4", "step_6"]

    # During a checkpoint write: step_10 is half written; step_8 and step_6 stay whole.
    proc = runs.train(config, "resume=true", fault="kill_during_save:10")
    assert proc.returncode == SIGKILLED, proc.stderr[-2000:]
    assert (out_dir(config) / ".step_10.tmp").is_dir()
    assert step_names(config) == ["step_6", "step_8"]  # pruning waits until a checkpoint is complete
    meta, params, state = load_checkpoint(out_dir(config) / "step_8")
    assert meta["step"] == 8 and params and state["optimizer"]["state"]

    proc = finished(runs.train(config, "resume=true"))
    assert f"resumed from {out_dir(config) / 'step_8'} at step 8" in proc.stdout
    assert sorted(p.name for p in out_dir(config).iterdir() if "step_" in p.name) == ["step_10", "step_12"]
    assert_same_weights(final_weights(config), reference, f"{task} SIGKILL x3")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _run_until_signal(config: Path, wait_for: str, sig: signal.Signals, *overrides: str) -> str:
    """Start training, send `sig` once checkpoint `wait_for` exists; return stdout. Asserts exit 0."""
    args = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(out_dir(config) / wait_for, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def test_sigterm_and_sigint_write_a_checkpoint_and_resume_exactly(text_runs):
    reference = text_runs.reference()
    config = text_runs.config()

    stdout = _run_until_signal(config, "step_2", signal.SIGTERM)
    assert "stopped by SIGTERM at step" in stdout
    assert f"Resume with: lora-scripts train --config {config} --set resume=true" in stdout
    stopped_at = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 2 <= stopped_at < TOTAL_STEPS
    assert step_names(config)[-1] == f"step_{stopped_at}"  # the step it finished, saved
    assert not (out_dir(config) / "adapter_model.safetensors").exists()

    resume_from = stopped_at + 2 - stopped_at % 2  # the next regular checkpoint of the resumed run
    stdout = _run_until_signal(config, f"step_{resume_from}", signal.SIGINT, "resume=true")
    assert f"resumed from {out_dir(config) / f'step_{stopped_at}'}" in stdout
    assert "stopped by SIGINT at step" in stdout and "Resume with: " in stdout

    finished(text_runs.train(config, "resume=true"))
    assert_same_weights(final_weights(config), reference, "text SIGTERM+SIGINT")


@pytest.mark.parametrize("task", ["text", "image"])
def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(task, request):
    runs: Runs = request.getfixturevalue(f"{task}_runs")
    config = runs.config()
    proc = runs.train(config, fault="nan_loss:5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("error: step 5: loss/gradient is not finite")
    assert "stopped before the update reached the weights" in error
    assert f"the last good checkpoint is {out_dir(config) / 'step_4'}" in error
    assert "learning rate is too high" in error and "fp16" in error and "nan_policy: skip" in error
    if task == "image":
        assert "SDXL's VAE overflows in fp16: set no_half_vae: true" in error
    assert step_names(config) == ["step_2", "step_4"]
    # The kept checkpoint is the good state of step 4: resuming from it ends as the uninterrupted run.
    finished(runs.train(config, "resume=true"))
    assert_same_weights(final_weights(config), runs.reference(), f"{task} NaN then resume")


def test_nan_policy_skip_skips_and_counts_the_step(text_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = text_runs.config(nan_policy="skip")
    finished(text_runs.train(config, fault="nan_loss:3"))
    logs = EventAccumulator(str(out_dir(config) / "logs"))
    logs.Reload()
    assert [(e.step, e.value) for e in logs.Scalars("train/skipped_steps")] == [(3, 1.0)]
    assert 3 not in [e.step for e in logs.Scalars("train/loss")]
    assert len(logs.Scalars("train/loss")) == TOTAL_STEPS - 1
    assert all(torch.isfinite(v).all() for v in final_weights(config).values())


def test_out_of_memory_names_the_remedies_in_order(text_runs):
    config = text_runs.config()
    proc = text_runs.train(config, fault="oom:3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: out of memory at step 3 with micro-batches of 2")
    positions = [error.find(remedy) for remedy in ("lower batch_size", "lower resolution", "lower lora_rank")]  # the spec's order
    assert -1 not in positions and positions == sorted(positions), error
    assert "raise gradient_accumulation_steps" in error and "auto_batch_size: true" in error
    assert step_names(config) == ["step_2"]


def test_auto_batch_size_halves_the_micro_batch_with_the_same_result(text_runs):
    keys = dict(auto_batch_size=True, lora_dropout=0.0)  # dropout masks depend on the batch shape
    reference = text_runs.reference(**keys)
    config = text_runs.config(**keys)
    proc = finished(text_runs.train(config, fault="oom:3"))
    assert "out of memory at step 3: retrying with micro-batches of 1 (2x accumulation)" in proc.stdout
    assert_same_weights(final_weights(config), reference, "text auto_batch_size", atol=1e-6)


def test_save_total_limit_keeps_the_newest_checkpoints(text_runs):
    out = out_dir(text_runs.reference_config())
    assert sorted(p.name for p in out.iterdir() if "step_" in p.name) == ["step_10", "step_12"]
    for folder in list_checkpoints(out):
        assert load_checkpoint(folder)[0]["step"] == int(folder.name.split("_")[1])


def test_too_little_disk_space_is_refused_before_training(text_runs, monkeypatch, capsys):
    config = text_runs.config()
    monkeypatch.setattr("lora_scripts.output_dir.shutil.disk_usage", lambda path: SimpleNamespace(total=2**34, used=2**34 - 2**16, free=2**16))
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: not enough disk space in ") and "MiB free" in error and "save_total_limit" in error
    assert not out_dir(config).exists()


def test_disk_full_while_saving_keeps_the_last_checkpoint(text_runs, monkeypatch, capsys):
    config = text_runs.config()
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if ".step_4.tmp" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("lora_scripts.checkpoint.torch.save", save_until_full)
    assert main(["train", "--config", str(config)]) == 2
    stderr = capsys.readouterr().err  # the progress bar shares stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr
    error = errors[0]
    assert "step_4" in error and "step_2" in error  # what failed, and what is kept
    assert step_names(config) == ["step_2"]
    assert load_checkpoint(out_dir(config) / "step_2")[0]["step"] == 2


def test_output_dir_that_cannot_be_written_is_refused(text_runs, monkeypatch, capsys):
    """As root, permissions do not stop writes; a refused probe file stands in for a read-only mount."""
    config = text_runs.config()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lora_scripts.output_dir.tempfile.NamedTemporaryFile", refuse)
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: output_dir {out_dir(config)}: cannot write there (Permission denied)"
    assert not out_dir(config).exists()
