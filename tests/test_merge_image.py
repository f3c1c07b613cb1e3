"""`lora-scripts merge` for image LoRAs: the merged single-file checkpoint, loaded by diffusers'
`from_single_file`, and the merged diffusers folder both give the base + LoRA at the strength
(as diffusers applies the LoRA dynamically), for SD1, SD2 and SDXL, text encoders included;
bad input is refused through the CLI with one line and nothing written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.export.kohya import diffusers_module_path, peft_to_kohya_state_dict, save_diffusers_lora, save_kohya_lora
from lora_scripts.export.merge_image import LoraUpdate, checkpoint_location, merge_image_lora
from lora_scripts.models.sd import load_sd_components
from tests.forkserver import ForkServer
from tests.test_kohya_format import full_size_lora_state, module_names, outputs, wrap_with_lora
from tests.tiny_sd import TinySD, make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

STRENGTH = 0.7
TOLERANCE = 1e-5  # float32, as issue 9 asks of merged models
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2_v": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@dataclass
class Trained:
    """A tiny pipeline, one LoRA on its UNet and text encoder(s) in both file layouts, and the
    reference outputs: the base, and the base with the LoRA loaded by diffusers at STRENGTH."""

    tiny: TinySD
    loras: dict[str, Path]  # kohya file, diffusers folder
    base: list[torch.Tensor]
    expected: list[torch.Tensor]


def pipeline_outputs(pipe, family: str) -> list[torch.Tensor]:
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return outputs(pipe.unet, encoders, family)


def train(folder: Path, family: str) -> Trained:
    tiny = make_tiny_sd(folder, family)
    components = load_sd_components(tiny.diffusers_dir)
    wrap_with_lora(components.unet, components.text_encoders)  # UNet r4 alpha 8, text r2 alpha 3
    kohya = folder / "style.safetensors"
    save_kohya_lora(kohya, peft_to_kohya_state_dict(components.unet, components.text_encoders, family), {})
    save_diffusers_lora(folder / "style_diffusers", components.unet, components.text_encoders)
    pipe = PIPELINES[family].from_pretrained(tiny.diffusers_dir)
    base = pipeline_outputs(pipe, family)
    pipe.load_lora_weights(str(kohya), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[STRENGTH])
    return Trained(tiny, {"kohya": kohya, "diffusers": folder / "style_diffusers"}, base, pipeline_outputs(pipe, family))


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def trained(request, tmp_path_factory) -> Trained:
    return train(tmp_path_factory.mktemp(request.param), request.param)


def max_diffs(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [float((g - w).abs().max()) for g, w in zip(got, want)]


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_single_file_merge_loads_with_from_single_file_as_base_plus_lora(trained, lora_format, tmp_path):
    family, base_file = trained.tiny.family, trained.tiny.single_file
    out = tmp_path / "merged.safetensors"
    assert merge_image_lora(base_file, trained.loras[lora_format], out, STRENGTH, "single_file") == out

    # diffusers' single-file loaders (UNet.from_single_file, create_diffusers_clip_model_from_ldm)
    merged = load_sd_components(out, config_dir=trained.tiny.config_dir)
    got = outputs(merged.unet, merged.text_encoders, family)
    diffs = max_diffs(got, trained.expected)
    print(f"{family} single-file merge of the {lora_format} LoRA, max |merged - dynamic|: {diffs}")
    assert max(diffs) < TOLERANCE
    assert min(max_diffs(trained.expected, trained.base)) > 1e-2  # the LoRA moves UNet and every text encoder

    before, after = load_file(base_file), load_file(out)
    assert after.keys() == before.keys()  # the same original (LDM/SGM) layout
    assert all(after[key].dtype == before[key].dtype for key in before)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for key in changed)
    if family != "sd1":  # OpenCLIP: the q/k/v LoRAs land in thirds of the fused in_proj
        assert any(key.endswith("attn.in_proj_weight") for key in changed)


def test_diffusers_folder_merge_equals_base_plus_lora(trained, tmp_path):
    family = trained.tiny.family
    out = tmp_path / "merged"
    assert merge_image_lora(trained.tiny.diffusers_dir, trained.loras["kohya"], out, STRENGTH, "diffusers") == out
    merged = PIPELINES[family].from_pretrained(out)
    diffs = max_diffs(pipeline_outputs(merged, family), trained.expected)
    print(f"{family} diffusers-folder merge, max |merged - dynamic|: {diffs}")
    assert max(diffs) < TOLERANCE
    assert not any("lora" in key for key in load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))


def first_dtype(path: Path) -> torch.dtype:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(next(iter(handle.keys()))).dtype


def test_diffusers_folder_merge_keeps_each_component_dtype(tmp_path):
    trained = train(tmp_path, "sd1")
    pipe = StableDiffusionPipeline.from_pretrained(trained.tiny.diffusers_dir, dtype=torch.float16)
    pipe.vae.to(torch.float32)  # a mixed folder: fp16 UNet and text encoder, fp32 VAE
    pipe.save_pretrained(tmp_path / "half")
    out = tmp_path / "merged_half"
    merge_image_lora(tmp_path / "half", trained.loras["diffusers"], out, STRENGTH, "diffusers")
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors"}
    assert {name: first_dtype(out / file) for name, file in files.items()} == {
        "unet": torch.float16, "vae": torch.float32, "text_encoder": torch.float16}
    vae_before, vae_after = load_file(tmp_path / "half" / files["vae"]), load_file(out / files["vae"])
    assert all(torch.equal(vae_before[key], vae_after[key]) for key in vae_before)


@pytest.mark.parametrize(("family", "fused"), [("sd1", 0), ("sd2", 23 * 3), ("sdxl", 32 * 3)])
def test_every_module_of_a_full_size_lora_finds_its_checkpoint_weight(family, fused):
    """The tiny models have two UNet levels; the real SD1.5 / SD2.1 / SDXL layouts (meta device,
    shipped configs) have every kohya module's weight under the key the merge writes."""
    _, _, original_keys, state = full_size_lora_state(family)
    locations = []
    for name in sorted(module_names(state)):
        component, path = diffusers_module_path(name, family, 2)
        update = LoraUpdate(name, component, path, state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], 1.0)
        locations.append(checkpoint_location(update, family, 2))
    assert all(location and location[0] in original_keys for location in locations)
    assert sum(third is not None for _, third in locations) == fused  # q, k, v in OpenCLIP's in_proj


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The CLI, warmed up once (tests/forkserver.py)."""
    server = ForkServer(["lora_scripts.export.merge_cmd", "lora_scripts.export.merge_image"], tmp_path_factory.mktemp("fork"))
    yield server
    server.close()


def test_bad_input_through_the_cli_fails_with_one_line_and_writes_nothing(tmp_path, tmp_path_factory, server):
    sd1 = train(tmp_path_factory.mktemp("bad_sd1"), "sd1")
    sdxl = make_tiny_sd(tmp_path / "xl", "sdxl")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(sd1.loras["kohya"].read_bytes()[:300])
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    cases = {
        # an SD1 LoRA into an SDXL checkpoint / diffusers folder: SDXL has no diffusers-named UNet modules
        "wrong family (single file)": (sdxl.single_file, sd1.loras["kohya"], tmp_path / "a.safetensors",
                                       "does not fit this sdxl base (no such layer)"),
        "wrong family (diffusers)": (sdxl.diffusers_dir, sd1.loras["diffusers"], tmp_path / "b",
                                     "does not fit this sdxl base"),
        "corrupt LoRA": (sd1.tiny.single_file, corrupt, tmp_path / "c.safetensors", "it may be truncated or corrupt"),
        "output exists": (sd1.tiny.single_file, sd1.loras["kohya"], existing, "already exists"),
    }
    before = sorted(tmp_path.rglob("*"))
    results = server.run_many([["merge", "--base", str(base), "--lora", str(lora), "--out", str(out), "--strength", "0.5"]
                               for base, lora, out, _ in cases.values()])
    for (case, (_, _, _, expect)), result in zip(cases.items(), results):
        stderr = result.stderr.strip()
        assert result.returncode == 2, (case, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expect in stderr, (case, stderr)
        print(f"{case}: {stderr}")
    assert sorted(tmp_path.rglob("*")) == before and existing.read_bytes() == b"keep me"
    assert "module lora_te_text_model_encoder_layers_0_mlp_fc1 does not fit" in results[0].stderr  # the first one
