"""An interrupted image run resumed from its checkpoint ends bit-identical to a straight run,
with every per-step random choice in play (crop, mirror, caption shuffle and dropout, noise offset)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.image_helpers import image_config, train_in_process, write_dataset
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)


def test_resume_continues_bit_exactly(tmp_path):
    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(40, 36), (36, 40), (48, 40), (40, 40)])
    options = dict(output_name="style", save_steps=2, cache_latents=False, random_crop=True, flip_aug=True,
                   shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3, noise_offset=0.1)
    straight = image_config(tmp_path, tiny.diffusers_dir, "straight.yaml", output_dir=str(tmp_path / "straight"), max_steps=4, **options)
    split = image_config(tmp_path, tiny.diffusers_dir, "split.yaml", output_dir=str(tmp_path / "split"), max_steps=2, **options)
    train_in_process(straight)
    assert train_in_process(split).step == 2
    assert train_in_process(split, "resume=true", "max_steps=4").step == 4

    expected = load_file(tmp_path / "straight" / "style.safetensors")
    resumed = load_file(tmp_path / "split" / "style.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    halfway = load_file(tmp_path / "split" / "step_2" / "style_step_2.safetensors")
    assert not all(torch.equal(expected[key], halfway[key]) for key in expected)  # steps 3-4 did change it
