"""Stable Diffusion loading: diffusers folders and original single files, family detection, errors."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_scripts.errors import UserError
from lora_scripts.models.sd import ASSETS, CLIP_TOKENIZER_DIR, load_sd_components
from lora_scripts.models.sd_detect import detect_sd_family
from tests.helpers import REPO
from tests.tiny_sd import make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

FAMILIES = ("sd1", "sd2_v", "sdxl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    return {family: make_tiny_sd(folder, family) for family in FAMILIES}


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_the_same_model_as_the_diffusers_folder(tiny, family):
    from_folder = load_sd_components(tiny[family].diffusers_dir)
    from_file = load_sd_components(tiny[family].single_file, config_dir=tiny[family].config_dir)

    for components in (from_folder, from_file):
        assert components.family == family
        expected = "v_prediction" if family == "sd2_v" else "epsilon"
        assert components.prediction_type == components.noise_scheduler.config.prediction_type == expected
        assert components.noise_scheduler.config.beta_schedule == "scaled_linear"
        assert len(components.text_encoders) == len(components.tokenizers) == (2 if family == "sdxl" else 1)
    assert_same_weights(from_folder.unet, from_file.unet)
    assert_same_weights(from_folder.vae, from_file.vae)
    for folder_encoder, file_encoder in zip(from_folder.text_encoders, from_file.text_encoders):
        assert type(folder_encoder) is type(file_encoder)
        assert_same_weights(folder_encoder, file_encoder)
    # OpenCLIP encoders (SD2, SDXL's second) pad with "!", OpenAI CLIP with <|endoftext|>
    pads = {"sd1": ["<|endoftext|>"], "sd2_v": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]
    assert [t.pad_token for t in from_file.tokenizers] == [t.pad_token for t in from_folder.tokenizers] == pads


def test_family_detection_and_override(tiny):
    for family in FAMILIES:
        assert detect_sd_family(tiny[family].diffusers_dir) == family
        assert detect_sd_family(tiny[family].single_file) == family
    assert detect_sd_family(tiny["sd2_v"].single_file, override="sd2") == "sd2"
    forced = load_sd_components(tiny["sd2_v"].single_file, family="sd2", config_dir=tiny["sd2_v"].config_dir)
    assert forced.prediction_type == forced.noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(UserError, match="unknown Stable Diffusion family 'sd3'"):
        detect_sd_family(tiny["sd1"].single_file, override="sd3")


def sd2_checkpoint(path, norm_bias: torch.Tensor | None, marker: bool = False):
    """A minimal SD2-shaped single file: UNet conv_in, an OpenCLIP key, optionally the v statistic."""
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.model.positional_embedding": torch.zeros(77, 1024),
    }
    if norm_bias is not None:
        tensors["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"] = norm_bias
    if marker:
        tensors["v_pred"] = torch.zeros(0)
    save_file(tensors, path)
    return path


def test_sd2_v_prediction_follows_comfyui_statistic(tmp_path):
    spread = torch.linspace(-1, 1, 320)
    assert detect_sd_family(sd2_checkpoint(tmp_path / "v.safetensors", spread * 0.3)) == "sd2_v"
    assert detect_sd_family(sd2_checkpoint(tmp_path / "eps.safetensors", spread * 0.05)) == "sd2"
    assert detect_sd_family(sd2_checkpoint(tmp_path / "marker.safetensors", spread * 0.05, marker=True)) == "sd2_v"
    assert detect_sd_family(sd2_checkpoint(tmp_path / "unknown.safetensors", None)) == "sd2_v"


def test_pickle_checkpoint_needs_consent(tiny, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny["sd1"].single_file), "global_step": 1}, ckpt)
    with pytest.raises(UserError, match=r"model\.ckpt is a pickle checkpoint.*allow_unsafe_pickle: true"):
        load_sd_components(ckpt, config_dir=tiny["sd1"].config_dir)
    with pytest.raises(UserError, match="allow_unsafe_pickle"):
        detect_sd_family(ckpt)
    loaded = load_sd_components(ckpt, allow_unsafe_pickle=True, config_dir=tiny["sd1"].config_dir)
    assert_same_weights(loaded.unet, load_sd_components(tiny["sd1"].diffusers_dir).unet)


def test_broken_and_foreign_files_are_user_errors(tiny, tmp_path):
    data = tiny["sd1"].single_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated\.safetensors is not a readable .*download it again"):
        load_sd_components(truncated)
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("not a model")
    with pytest.raises(UserError, match="notes.safetensors is not a readable"):
        detect_sd_family(not_safetensors)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, lora)
    with pytest.raises(UserError, match=r"lora\.safetensors holds no Stable Diffusion UNet"):
        load_sd_components(lora)
    with pytest.raises(UserError, match=r"missing\.safetensors does not exist"):
        load_sd_components(tmp_path / "missing.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="unknown checkpoint type '.gguf'"):
        load_sd_components(tmp_path / "model.gguf")


def test_mismatched_configs_and_incomplete_folders_are_user_errors(tiny, tmp_path):
    with pytest.raises(UserError, match=r"does not fit the sd1 configs in .*assets/sd/sd1.*set `family`"):
        load_sd_components(tiny["sd1"].single_file)  # tiny weights, full-size shipped configs
    with pytest.raises(UserError, match="lacks text_encoder_2/config.json"):
        load_sd_components(tiny["sd1"].single_file, family="sdxl", config_dir=tiny["sd1"].config_dir)
    with pytest.raises(UserError, match="model_index.json is missing"):
        load_sd_components(tiny["sd1"].config_dir)
    broken = tmp_path / "broken"
    shutil.copytree(tiny["sd1"].diffusers_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot load the diffusers folder .*broken"):
        load_sd_components(broken)


@pytest.mark.parametrize(
    ("folder", "unet", "vae", "text_encoders"),
    [  # published parameter counts of SD1.5, SD2.1 and SDXL base
        ("sd1", 859_520_964, 83_653_863, [123_060_480]),
        ("sd2", 865_910_724, 83_653_863, [340_387_840]),
        ("sdxl", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
    ],
)
def test_shipped_configs_build_the_real_architectures(folder, unet, vae, text_encoders):
    configs = ASSETS / "sd" / folder

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))) == unet
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))) == vae
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        subfolders = ["text_encoder", "text_encoder_2"]
        counts = [count(cls(CLIPTextConfig.from_pretrained(configs / sub))) for cls, sub in zip(classes, subfolders)
                  if (configs / sub).is_dir()]
    assert counts == text_encoders


def test_shipped_tokenizer_is_clip_bpe_and_rebuilds_identically(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    # the canonical CLIP example ids (transformers' CLIPTokenizer docs / OpenAI CLIP)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_clip_tokenizer.py"), str(tmp_path)],
                          capture_output=True, text=True, check=True)
    assert "49408 tokens and 48894 merges" in proc.stdout
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, CLIP_TOKENIZER_DIR / name, shallow=False), name
