"""Training on several processes, on CPU over gloo, on 127.0.0.1 only.

- `lora-scripts train --num-processes 2` (text) and `accelerate launch -m lora_scripts train`
  (image) reach one process's weights with the doubled per-device batch, with a last micro-batch
  of one sample (the second process runs a zero-weighted stand-in).
- Two "machines" (two launches, `--machine-rank 0/1`) train and save once.
- One run taken through SIGTERM (both ranks stop at one checkpoint), a SIGKILLed rank (the job
  ends with that rank's error long before the collectives timeout), a SIGKILLed launcher (its
  ranks die with it) and a resume ends bit-identical to the uninterrupted two-process run.
- A stalled rank ends the job after `distributed.timeout_minutes`; bad launch flags are refused.

Tolerance of the 1-vs-2-process comparisons: the two runs add the same float32 numbers in a
different order (per-process partial sums, then gloo's all-reduce), so gradients differ by ~1e-7
relative. AdamW divides by sqrt(v) + 1e-8, which turns a rounding difference in a gradient
element near zero into an update difference up to lr x (difference / 1e-8); measured: at most
0.7% of lr on an element, 1e-5 of the weights' norm. A wrong data order, loss scale or noise
draw moves the weights by ~lr on every element, far outside `assert_close_runs`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts.checkpoint import list_checkpoints
from lora_scripts.cli import main
from lora_scripts.launch import free_port
from tests.helpers import REPO, text_config, write_qa_jsonl

TEXT_ROWS = 21  # global micro-batches of 4: the last holds one sample, so rank 1 has none
TEXT_KEYS = dict(batch_size=2, gradient_accumulation_steps=2, epochs=2, learning_rate="2e-3")
# 21 rows, global micro-batch 4, 2 per step: 3 steps per epoch, 24 steps
CHAIN_KEYS = dict(batch_size=2, gradient_accumulation_steps=2, epochs=8, save_steps=2, save_total_limit=2, lora_dropout=0.1)
MEASURED: dict[str, str] = {}  # printed at the end of the module


@dataclass
class Launched:
    """A command started in the background; stdout/stderr go to files."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    started: float

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it ends."""
        code = self.proc.wait(timeout=timeout)
        return code, self.stdout.read_text(encoding="utf-8"), self.stderr.read_text(encoding="utf-8")

    def rank_pids(self) -> dict[int, int]:
        """RANK -> pid of the launcher's children."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        ranks = {}
        for pid in map(int, children):
            environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
            ranks[int(environ["RANK"])] = pid
        return ranks


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> Launched:
    """Run `python ARGS` from the repository on the CPU, one torch thread per process."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out.open("w"), stderr=err.open("w"),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    return Launched(proc, out, err, time.monotonic())


def train_args(config: Path, *flags: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return ["-m", "lora_scripts.cli", "train", "--config", str(config), *flags, *[a for o in overrides for a in ("--set", o)]]


def succeeded(launched: Launched) -> str:
    """stdout of a run that ended well."""
    code, out, err = launched.wait()
    assert code == 0, err[-3000:]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final LoRA file(s) in `folder`."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no final LoRA in {folder}"
    return {f"{file.name}:{key}": value for file in files for key, value in load_file(file).items()}


def assert_close_runs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], lr: float, label: str) -> None:
    """Same weights up to float32 summation order (module docstring): every element within 2% of
    one step's largest AdamW move (lr), and the whole within 1e-4 of the weights' norm."""
    assert got.keys() == want.keys()
    keys = [k for k in want if want[k].numel() > 1]  # kohya's alpha scalars are constants
    diff = torch.cat([(got[k].double() - want[k].double()).flatten() for k in keys])
    norm = torch.cat([want[k].double().flatten() for k in keys]).norm()
    largest, relative = float(diff.abs().max()), float(diff.norm() / norm)
    MEASURED[label] = f"max |diff| {largest:.2g} (= {largest / lr:.2g} x lr), relative {relative:.2g}"
    assert norm > 0 and largest <= 0.02 * lr and relative <= 1e-4, MEASURED[label]


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), f"{label}: largest difference {max(float((got[k] - want[k]).abs().max()) for k in want):.3g}"
    MEASURED[label] = "bit-identical"


def wait_for(path: Path, launched: Launched, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert launched.proc.poll() is None, f"the run ended before {path.name} appeared: {launched.stderr.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def is_gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def text_setup(folder: Path, model: Path, **keys) -> Path:
    folder.mkdir(parents=True)
    data = write_qa_jsonl(folder / "rows.jsonl", n=TEXT_ROWS)
    return text_config(folder, model, train_data_dir=str(data), **keys)


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """The runs in this process train on the CPU too, as the launched ones (a GPU would change the sums)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module", autouse=True)
def report_measurements():
    yield
    if MEASURED:
        print("\n" + "\n".join(f"{k}: {v}" for k, v in MEASURED.items()), file=sys.stderr)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, tiny_llm_dir) -> Path:
    """The chain's config trained by two launches of one rank each, `--machine-rank 0` and `1`
    on 127.0.0.1, as two machines sharing a file system; returns its config (output_dir: out)."""
    root = tmp_path_factory.mktemp("two_machines")
    config = text_setup(root / "run", tiny_llm_dir, **CHAIN_KEYS)
    flags = ["--num-processes", "2", "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", str(free_port())]
    machines = [start(train_args(config, *flags, "--machine-rank", str(rank)), root / f"machine{rank}") for rank in (0, 1)]
    outputs = [succeeded(machine) for machine in machines]
    return config, outputs


def test_two_processes_reach_the_one_process_weights_text(tmp_path, tiny_llm_dir):
    config = text_setup(tmp_path / "run", tiny_llm_dir, **TEXT_KEYS)
    two = start(train_args(config, "--num-processes", "2", overrides=("output_dir=" + str(tmp_path / "two"),)), tmp_path / "two")
    assert main(["train", "--config", str(config), "--set", "batch_size=4", "--set", f"output_dir={tmp_path / 'one'}"]) == 0
    out = succeeded(two)
    assert "1 micro-batch(es)" not in out and "2 micro-batch(es) of 2 per process x 2 processes: global batch 8 per step" in out
    assert out.count("done: 6 steps") == 1 and out.count("plan: ") == 1  # rank 1 prints nothing
    assert_close_runs(weights(tmp_path / "two"), weights(tmp_path / "one"), 2e-3, "text 2 processes vs 1")


def test_accelerate_launch_reaches_the_one_process_weights_image(tmp_path):
    from tests.image_helpers import image_config, train_in_process, write_dataset
    from tests.tiny_sd import make_tiny_sd

    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(32, 32)] * 5)  # global micro-batches of 2: the last holds one image
    config = image_config(tmp_path, tiny.diffusers_dir, batch_size=1, epochs=2, output_name="style", cache_latents_to_disk=True)
    # --multi_gpu only picks accelerate's torchrun path (--cpu would start one process without mpirun);
    # with no GPU the ranks join over gloo on CPU.
    two = start(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                 "-m", "lora_scripts", "train", "--config", str(config), "--set", f"output_dir={tmp_path / 'two'}"], tmp_path / "two")
    out = succeeded(two)
    assert "latents: 5 encoded, 0 from disk cache" in out and out.count("plan: ") == 1
    assert "1 micro-batch(es) of 1 per process x 2 processes: global batch 2 per step" in out
    assert len(list((tmp_path / "data" / ".lora_cache").glob("*.safetensors"))) == 5  # encoded once, by the main process
    train_in_process(config, "batch_size=2", f"output_dir={tmp_path / 'one'}")
    assert_close_runs(weights(tmp_path / "two"), weights(tmp_path / "one"), 1e-2, "image 2 processes (accelerate launch) vs 1")


def test_two_machines_train_and_save_once(two_machines):
    config, (first, second) = two_machines
    out = config.parent / "out"
    assert "launched ranks 0-0 of 2 (machine 0 of 2)" in first and "launched ranks 1-1 of 2 (machine 1 of 2)" in second
    assert first.count("done: 24 steps") == 1 and "done:" not in second and "plan:" not in second
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer
    assert [p.name for p in list_checkpoints(out)] == ["step_22", "step_24"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert (out / "adapter_model.safetensors").is_file()


def test_sigterm_killed_rank_and_killed_job_resume_to_the_uninterrupted_weights(tmp_path, two_machines, tiny_llm_dir):
    reference, _ = two_machines
    config = text_setup(tmp_path / "run", tiny_llm_dir, **CHAIN_KEYS)
    out, flags = tmp_path / "run" / "out", ["--num-processes", "2"]

    # SIGTERM to the launcher: both ranks finish the same step, one checkpoint, exit 0.
    run = start(train_args(config, *flags), tmp_path / "a")
    wait_for(out / "step_2", run)
    run.proc.send_signal(signal.SIGTERM)
    stdout = succeeded(run)
    assert stdout.count("stopped by SIGTERM at step ") == 1, stdout
    stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert f"Resume with: lora-scripts train --config {config} --set resume=true --num-processes 2" in stdout
    assert [p.name for p in list_checkpoints(out)][-1] == f"step_{stopped}" and not (out / "adapter_model.safetensors").exists()

    # SIGKILL one rank: the job ends with that rank's error, not after the 30-minute timeout.
    run = start(train_args(config, *flags, overrides=("resume=true",)), tmp_path / "b")
    wait_for(out / f"step_{stopped + 2 - stopped % 2}", run)
    killed_at = time.monotonic()
    os.kill(run.rank_pids()[1], signal.SIGKILL)
    code, _, stderr = run.wait()
    MEASURED["killed rank -> job ended"] = f"{time.monotonic() - killed_at:.1f} s"
    assert code != 0 and stderr.strip().splitlines()[-1] == "rank 1 failed: killed by SIGKILL", stderr[-2000:]
    assert time.monotonic() - killed_at < 30

    # SIGKILL the launcher: its ranks die with it, nothing final is written.
    run = start(train_args(config, *flags, overrides=("resume=true",)), tmp_path / "c")
    newest = int(list_checkpoints(out)[-1].name.split("_")[1])
    wait_for(out / f"step_{newest + 2}", run)
    ranks = run.rank_pids()
    run.proc.kill()
    run.proc.wait()
    deadline = time.monotonic() + 20
    while not all(is_gone(pid) for pid in ranks.values()):
        assert time.monotonic() < deadline, "ranks outlived their launcher"
        time.sleep(0.05)
    assert not (out / "adapter_model.safetensors").exists()

    stdout = succeeded(start(train_args(config, *flags, overrides=("resume=true",)), tmp_path / "d"))
    assert f"resumed from {list_checkpoints(out)[0].parent}" in stdout
    assert_identical(weights(out), weights(reference.parent / "out"), "SIGTERM + killed rank + killed job, resumed (2 processes)")


def test_a_stalled_rank_ends_the_job_after_the_timeout(tmp_path, tiny_llm_dir):
    config = text_setup(tmp_path / "run", tiny_llm_dir, **{**TEXT_KEYS, "epochs": 50, "save_steps": 1})
    run = start(train_args(config, "--num-processes", "2", overrides=("distributed={timeout_minutes: 0.2}",)), tmp_path / "stall")
    wait_for(tmp_path / "run" / "out" / "step_1", run)
    os.kill(run.rank_pids()[1], signal.SIGSTOP)
    stalled_at = time.monotonic()
    code, _, stderr = run.wait(timeout=120)
    MEASURED["stalled rank -> job ended (timeout 12 s)"] = f"{time.monotonic() - stalled_at:.1f} s"
    line = stderr.strip().splitlines()[-1]
    assert code == 2 and line.startswith("rank 0 failed: error: lost contact with the other processes"), stderr[-2000:]
    assert "distributed.timeout_minutes = 0.2" in line


@pytest.mark.parametrize(("flags", "keys", "expected"), [
    (["--num-processes", "3", "--num-machines", "2"], {}, "it must be a multiple of --num-machines 2"),
    (["--num-processes", "2", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "127.0.0.1"], {}, "--machine-rank 2: must be 0 to 1"),
    (["--num-processes", "2", "--num-machines", "2"], {}, "--main-process-ip: with several machines"),
    ([], {"distributed": {"strategy": "fsdp"}}, "accelerate runs FSDP on GPUs only"),
    ([], {"distributed": {"strategy": "deepspeed"}}, "pip install deepspeed"),
    ([], {"distributed": {"accelerate_config": "missing.yaml"}}, "distributed.accelerate_config missing.yaml: file not found"),
])
def test_launch_problems_are_one_line(tmp_path, tiny_llm_dir, capsys, flags, keys, expected):
    config = text_setup(tmp_path / "run", tiny_llm_dir, **keys)
    assert main(["train", "--config", str(config), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and len(error.splitlines()) == 1 and expected in error, error
    assert not (tmp_path / "run" / "out").exists()


def test_fsdp_saves_a_whole_adapter_and_restores_its_shards(tmp_path, tiny_llm_dir):
    """What FSDP changes in the loop's saving, on torch's FSDP2 over gloo (tests/fsdp_rank.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.fsdp_rank import LR, global_batch, lora_model, train_step

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [start(["-m", "tests.fsdp_rank", str(tiny_llm_dir), str(tmp_path)], tmp_path / f"rank{r}", {**env, "RANK": str(r)}) for r in (0, 1)]
    for rank in ranks:
        succeeded(rank)

    # the adapter is a normal PEFT adapter of whole tensors (rank 4, not half of one)...
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(v.shape[0] == 4 for k, v in saved.items() if "lora_A" in k) and all(v.shape[1] == 4 for k, v in saved.items() if "lora_B" in k)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), str(tmp_path / "adapter"))
    # ...holding what one unsharded process trains on the whole batch
    reference = lora_model(str(tiny_llm_dir))
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR)
    for _ in range(2):
        train_step(reference, optimizer, global_batch(reference.config.vocab_size))
    trained = {k: v for k, v in reference.named_parameters() if v.requires_grad}
    assert_close_runs({k: v.detach() for k, v in loaded.named_parameters() if k in trained}, {k: v.detach() for k, v in trained.items()},
                      LR, "FSDP2 (2 processes) adapter vs 1 unsharded process")
    # the saved parameters and optimizer state, sharded again, continue exactly as the original
    step3 = load_file(tmp_path / "step3.safetensors")
    continued = {k.removeprefix("continued."): v for k, v in step3.items() if k.startswith("continued.")}
    assert_identical({k.removeprefix("resumed."): v for k, v in step3.items() if k.startswith("resumed.")}, continued, "FSDP2 restore then one step")
