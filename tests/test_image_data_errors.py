"""Bad image datasets: a path leaving the folder is refused; missing, truncated and uncaptioned
images are reported, then stop the run or (skip_bad_images) are skipped and counted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.tasks.image import preflight
from tests.helpers import run_cli
from tests.image_helpers import image_config, save_image, train_in_process, write_dataset
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny"), "sd1")


def test_a_filename_leading_outside_the_dataset_is_refused(tmp_path, tiny_sd1):
    data = write_dataset(tmp_path / "data", [(32, 32)])
    save_image(tmp_path / "x.png", (32, 32), seed=9)
    (data / "metadata.csv").write_text('filename,prompt\nimg0.png,a\n../x.png,"stolen"\n', encoding="utf-8")
    proc = run_cli("train", "--config", str(image_config(tmp_path, tiny_sd1.diffusers_dir)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: metadata.csv:3: ../x.png leads outside {data}; copy the image into the folder"]
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_missing_and_truncated_images_stop_the_run_or_are_skipped(tmp_path, tiny_sd1, capsys):
    data = write_dataset(tmp_path / "data", [(32, 32)] * 4)
    truncated = data / "img3.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with (data / "metadata.csv").open("a", encoding="utf-8") as handle:
        handle.write("gone.png,missing picture\n")
    config = image_config(tmp_path, tiny_sd1.diffusers_dir, max_steps=1)
    with pytest.raises(UserError, match=r"^2 bad image\(s\) in .*; fix or remove them, or set skip_bad_images: true"):
        train_in_process(config)
    report = capsys.readouterr().out
    assert "2 bad image(s):" in report and "metadata.csv:6: gone.png does not exist" in report and "img3.png: truncated" in report

    train_in_process(config, "skip_bad_images=true")
    stdout = capsys.readouterr().out
    assert "skip_bad_images: skipped 2 bad image(s); training on 3" in stdout and "3 images" in stdout
    assert (tmp_path / "out" / "out.safetensors").is_file()


def test_caption_files_and_repeat_folders_with_an_uncaptioned_image(tmp_path, tiny_sd1, capsys):
    data = write_dataset(tmp_path / "data", [(32, 32)], csv=False)
    save_image(data / "bare.png", (32, 32), seed=5)  # no caption file
    save_image(data / "3_mystyle" / "a.png", (32, 32), seed=6)  # captioned "mystyle" by its folder, as in kohya
    save_image(data / "3_mystyle" / "b.png", (64, 32), seed=7)
    (data / "3_mystyle" / "b.txt").write_text("ink wash painting, boat", encoding="utf-8")
    config = image_config(tmp_path, tiny_sd1.diffusers_dir, max_steps=1)
    with pytest.raises(UserError, match="1 bad image"):
        train_in_process(config)
    assert "bare.png: no .txt caption file beside bare.png" in capsys.readouterr().out
    train_in_process(config, "skip_bad_images=true")
    assert "3 images (7 per epoch with repeats) in buckets 32x32: 2, 64x32: 1" in capsys.readouterr().out


def test_config_problems_are_reported_together_and_pickles_need_consent(tmp_path, tiny_sd1):
    write_dataset(tmp_path / "data", [(32, 32)])
    config = image_config(tmp_path, tiny_sd1.diffusers_dir, random_crop=True, text_encoder_lr=1e-4, resolution=100)
    with pytest.raises(UserError) as error:
        preflight(load_config(config))
    assert str(error.value).splitlines() == [
        "random_crop needs a new crop every time, which cached latents cannot give; set cache_latents: false",
        "resolution 100 must be a multiple of 8 (the VAE's pixel grid)",
        "text_encoder_lr is set but train_text_encoder is false; set train_text_encoder: true or remove text_encoder_lr",
    ]
    checkpoint = tmp_path / "v1-5-pruned.ckpt"
    torch.save(load_file(tiny_sd1.single_file), checkpoint)
    with pytest.raises(UserError, match="allow_unsafe_pickle"):
        preflight(load_config(image_config(tmp_path, checkpoint)))
