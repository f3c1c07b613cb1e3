"""Sample grids while training, and `lora-scripts generate` with the trained LoRA at a strength."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.config import load_config
from lora_scripts.tasks.image_generate import generate_images
from tests.helpers import run_cli
from tests.image_helpers import image_config, train_in_process, write_dataset
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

PROMPT = "ink wash painting, mountain --w 32 --h 32"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_samples_while_training_then_generate_at_a_strength(tmp_path):
    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(32, 32)] * 4)
    config = image_config(tmp_path, tiny.diffusers_dir, max_steps=2, sample_every_n_steps=1, sample_steps=3,
                          sample_prompts=[PROMPT, "pastel color palette --n blurry --w 48 --h 32 --d 5"])
    train_in_process(config)
    out = tmp_path / "out"
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["step_1.png", "step_2.png"]
    assert Image.open(out / "samples" / "step_2.png").size == (32 + 48, 32)
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [1, 2]

    proc = run_cli("generate", "--config", str(config), "--prompt", PROMPT, "--lora-scale", "0.8", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = out / "generated" / "00-ink-wash-painting-mountain.png"
    assert proc.stdout.split() == [str(written)] and Image.open(written).size == (32, 32)

    cfg = load_config(config)
    render = lambda scale, adapter, folder: pixels(generate_images(cfg, [PROMPT], scale, tmp_path / folder, 3, cfg.seed, adapter)[0])  # noqa: E731
    base = render(1.0, None, "base")
    assert np.array_equal(render(0.0, out, "scale0"), base)  # strength 0 is the base model exactly
    full = render(1.0, out / "out.safetensors", "scale1")
    at_08 = pixels(written)
    assert np.abs(full - base).max() > 3 and 0 < np.abs(at_08 - base).max() < np.abs(full - base).max() + 1
    # the kohya file at strength 1 renders what the trained model rendered at its last step
    assert np.abs(full - pixels(out / "samples" / "step_2.png")[:, :32]).max() <= 1
