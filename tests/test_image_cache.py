"""Latent and text-encoder caching: nothing is encoded again after the first pass, and the disk
cache serves a later run until an image changes."""

from __future__ import annotations

from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from tests.image_helpers import image_config, save_image, train_in_process, write_dataset
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)


def count_calls(monkeypatch, cls, method: str) -> list[int]:
    """Batch sizes of every call of cls.method from now on."""
    calls: list[int] = []
    original = getattr(cls, method)

    def counting(self, inputs, *args, **kwargs):
        calls.append(inputs.shape[0])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(cls, method, counting)
    return calls


def test_two_epochs_encode_each_image_once(tmp_path, monkeypatch, capsys):
    tiny = make_tiny_sd(tmp_path, "sd1")
    write_dataset(tmp_path / "data", [(32, 32), (32, 32), (64, 32), (32, 32)])
    config = image_config(tmp_path, tiny.diffusers_dir, epochs=2)
    encoded = count_calls(monkeypatch, AutoencoderKL, "encode")
    text_encoded = count_calls(monkeypatch, CLIPTextModel, "forward")
    result = train_in_process(config)
    assert result.step == 6  # 3 micro-batches per epoch (buckets of 3 and 1 images, 2 per batch)
    assert sum(encoded) == 4 and sum(text_encoded) == 4  # every image and caption once, before step 1
    assert "latents: 4 encoded, 0 from disk cache; text encoder outputs cached" in capsys.readouterr().out

    encoded.clear()
    train_in_process(config, f"output_dir={tmp_path / 'uncached'}", "cache_latents=false", "shuffle_caption=true")
    assert sum(encoded) == 8  # without the cache every epoch encodes every image again
    assert "latents: encoded every step; text encoder outputs computed every step" in capsys.readouterr().out


def test_disk_cache_is_reused_across_runs_until_an_image_changes(tmp_path, monkeypatch, capsys):
    tiny = make_tiny_sd(tmp_path, "sd1")
    data = write_dataset(tmp_path / "data", [(32, 32)] * 4)
    config = image_config(tmp_path, tiny.diffusers_dir, max_steps=1, cache_latents_to_disk=True)
    train_in_process(config)
    assert f"latents: 4 encoded, 0 from disk cache (disk cache {data / '.lora_cache'})" in capsys.readouterr().out
    assert len(list((data / ".lora_cache").glob("*.safetensors"))) == 4

    encoded = count_calls(monkeypatch, AutoencoderKL, "encode")
    train_in_process(config, f"output_dir={tmp_path / 'second'}")
    assert encoded == [] and "latents: 0 encoded, 4 from disk cache" in capsys.readouterr().out

    save_image(data / "img2.png", (32, 32), seed=99)  # new pixels: a new key
    train_in_process(config, f"output_dir={tmp_path / 'third'}")
    assert sum(encoded) == 1 and "latents: 1 encoded, 3 from disk cache" in capsys.readouterr().out
