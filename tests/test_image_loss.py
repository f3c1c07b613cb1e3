"""The diffusion loss against the textbook formulas, SDXL's size/crop conditioning, caption handling."""

from __future__ import annotations

import pytest
import torch

from lora_scripts.config import validate_config
from lora_scripts.models.sd import load_sd_components
from lora_scripts.tasks.image_data import ImageCollate, augment_caption, select_images
from lora_scripts.tasks.image_model import LossSettings, SDLoRAModel
from tests.image_helpers import save_image
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("family", ["sd1", "sd2_v"])
def test_loss_is_the_min_snr_weighted_prediction_error(tmp_path, family):
    components = load_sd_components(make_tiny_sd(tmp_path, family).diffusers_dir)
    gamma, offset = 5.0, 0.1
    model = SDLoRAModel(components, LossSettings(components.prediction_type, False, offset, gamma)).eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    embeds = torch.randn(3, 77, 32, generator=generator)
    torch.manual_seed(1)
    with torch.no_grad():
        loss = model({"latents": latents, "prompt_embeds": embeds})

    # DDPM (Ho et al. 2020) with SD's scaled-linear betas; v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
    torch.manual_seed(1)
    noise = torch.randn_like(latents) + offset * torch.randn(3, 4, 1, 1)
    timesteps = torch.randint(0, 1000, (3,))
    config = components.noise_scheduler.config
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if family == "sd2_v":
        assert components.prediction_type == "v_prediction"
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    else:
        target = noise
    with torch.no_grad():
        prediction = components.unet(noisy.float(), timesteps, embeds).sample
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    weight = snr.clamp(max=gamma) / (snr + 1 if family == "sd2_v" else snr)
    expected = (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weight).sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_sdxl_batches_carry_original_size_crop_and_target(tmp_path):
    data = tmp_path / "data"
    save_image(data / "tall.png", (40, 48), seed=1)
    save_image(data / "wide.png", (80, 40), seed=2)
    (data / "metadata.csv").write_text("filename,prompt\ntall.png,a tall one\nwide.png,a wide one\n", encoding="utf-8")
    cfg = validate_config(dict(base_model=str(tmp_path), train_data_dir=str(data), output_dir=str(tmp_path / "out"),
                               bucket_reso_steps=32, flip_aug=True))
    samples = select_images(cfg, 1024, report=False)
    assert [(s.size, s.placement.bucket, s.placement.resized) for s in samples] == [
        ((40, 48), (32, 32), (32, 38)), ((80, 40), (64, 32), (64, 32))]
    collate = ImageCollate(cfg, lambda captions: [torch.zeros(len(captions), 77, dtype=torch.long)] * 2, None, sdxl=True)
    tall = collate([samples[0]])
    assert tall["pixels"].shape == (1, 3, 32, 32) and -1 <= tall["pixels"].min() and tall["pixels"].max() <= 1
    # (original height, width, crop top, left, target height, width), as SDXL's pipeline builds add_time_ids
    assert tall["time_ids"].tolist() == [[48.0, 40.0, 3.0, 0.0, 32.0, 32.0]]
    assert collate([samples[1]])["time_ids"].tolist() == [[40.0, 80.0, 0.0, 0.0, 32.0, 64.0]]
    assert set(tall) == {"pixels", "input_ids_0", "input_ids_1", "time_ids"}


def test_caption_shuffle_keeps_leading_tags_and_dropout_empties():
    torch.manual_seed(0)
    caption = "mystyle, ink wash painting, mountain, river, boat, moon"
    shuffled = [augment_caption(caption, True, 1, 0.0) for _ in range(20)]
    assert all(s.startswith("mystyle, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert len(set(shuffled)) > 10
    assert augment_caption(caption, False, 0, 0.0) == caption
    dropped = [augment_caption(caption, False, 0, 0.25) for _ in range(400)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", caption}
