"""`lora-scripts convert` between kohya and diffusers image LoRAs: kohya → diffusers → kohya gives
back the same tensors and metadata; the converted files hold the keys diffusers' own
`save_lora_weights` writes, and diffusers' `load_lora_weights` gives the same UNet and text
encoder outputs on them as on the source; bad input fails through the CLI with one line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.export.kohya import kohya_metadata, peft_to_kohya_state_dict, save_diffusers_lora, save_kohya_lora
from lora_scripts.models.sd import load_sd_components
from tests.forkserver import ForkServer
from tests.test_kohya_format import facts, outputs, wrap_with_lora
from tests.tiny_sd import TinySD, make_tiny_sd, single_torch_thread  # noqa: F401  (autouse fixture)

PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
TOLERANCE = 1e-5


@dataclass
class Source:
    """A tiny pipeline with one LoRA saved by the project's exporters: as kohya (with training
    metadata, one UNet module at another rank and one at another alpha; fp16 alphas for SDXL) and
    as a diffusers folder."""

    tiny: TinySD
    kohya: Path
    diffusers: Path


def make_source(folder: Path, family: str) -> Source:
    tiny = make_tiny_sd(folder, family)
    components = load_sd_components(tiny.diffusers_dir)
    wrap_with_lora(components.unet, components.text_encoders)
    state = peft_to_kohya_state_dict(components.unet, components.text_encoders, family)
    # kohya files can mix ranks and alphas (network_args, resize_lora): both must survive conversion
    odd_rank, odd_alpha = sorted(key.split(".")[0] for key in state if key.startswith("lora_unet_"))[::3][:2]
    state[f"{odd_rank}.lora_down.weight"] = state[f"{odd_rank}.lora_down.weight"][:2].clone()
    state[f"{odd_rank}.lora_up.weight"] = state[f"{odd_rank}.lora_up.weight"][:, :2].clone()
    state[f"{odd_alpha}.alpha"] = torch.tensor(5.0)
    if family == "sdxl":  # sd-scripts saves alpha in the save precision: an fp16 file's alphas are fp16
        state = {key: value.half() if key.endswith(".alpha") else value for key, value in state.items()}
    kohya = folder / "style.safetensors"
    save_kohya_lora(kohya, state, kohya_metadata(facts(family)))
    save_diffusers_lora(folder / "style_diffusers", components.unet, components.text_encoders)
    return Source(tiny, kohya, folder / "style_diffusers")


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def source(request, tmp_path_factory) -> Source:
    return make_source(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The CLI, warmed up once (tests/forkserver.py)."""
    server = ForkServer(["lora_scripts.export.convert_image"], tmp_path_factory.mktemp("fork"))
    yield server
    server.close()


def convert(server: ForkServer, *argv: str) -> str:
    result = server.run("convert", *argv)
    assert result.returncode == 0, result.stderr
    return result.stdout


def header(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def lora_outputs(model_dir: Path, family: str, lora: Path) -> list[torch.Tensor]:
    pipe = PIPELINES[family].from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return outputs(pipe.unet, encoders, family)


def test_kohya_to_diffusers_to_kohya_is_exact_and_loads_the_same(source, tmp_path, server):
    family = source.tiny.family
    converted, back = tmp_path / "converted", tmp_path / "back.safetensors"
    stdout = convert(server, "--lora", str(source.kohya), "--to", "diffusers", "--out", str(converted))
    assert f"wrote {converted / 'pytorch_lora_weights.safetensors'}" in stdout and "kohya -> diffusers" in stdout
    convert(server, "--lora", str(converted), "--to", "kohya", "--out", str(back))  # family from the kept metadata

    original, returned = load_file(source.kohya), load_file(back)
    assert returned.keys() == original.keys()
    assert all(torch.equal(returned[k], original[k]) and returned[k].dtype == original[k].dtype for k in original)
    assert header(back) == header(source.kohya)

    # the diffusers file: the keys save_lora_weights writes, alpha as diffusers' own LoraConfig metadata
    diffusers_file = converted / "pytorch_lora_weights.safetensors"
    assert load_file(diffusers_file).keys() == load_file(source.diffusers / "pytorch_lora_weights.safetensors").keys()
    config = json.loads(header(diffusers_file)["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 8.0, 3.0)
    assert list(config["unet.rank_pattern"].values()) == [2] and list(config["unet.alpha_pattern"].values()) == [5.0]

    expected = lora_outputs(source.tiny.diffusers_dir, family, source.kohya)
    diffs = [float((a - b).abs().max()) for a, b in zip(lora_outputs(source.tiny.diffusers_dir, family, converted), expected)]
    print(f"{family}: load_lora_weights(converted diffusers) vs (kohya source), max diff per output {diffs}")
    assert max(diffs) < TOLERANCE


def test_diffusers_lora_to_kohya_loads_the_same(source, tmp_path, server):
    family, kohya = source.tiny.family, tmp_path / "from_diffusers.safetensors"
    # a diffusers-made LoRA carries no family; the tiny models' widths match no real one, so say it
    convert(server, "--lora", str(source.diffusers), "--to", "kohya", "--out", str(kohya), "--family", family)
    names = {key.split(".")[0] for key in load_file(kohya)}
    assert any(name.startswith("lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_") for name in names)
    expected = lora_outputs(source.tiny.diffusers_dir, family, source.diffusers)
    diffs = [float((a - b).abs().max()) for a, b in zip(lora_outputs(source.tiny.diffusers_dir, family, kohya), expected)]
    print(f"{family}: load_lora_weights(converted kohya) vs (diffusers source), max diff per output {diffs}")
    assert max(diffs) < TOLERANCE


def test_bad_input_through_the_cli_fails_with_one_line_and_writes_nothing(tmp_path, tmp_path_factory, server):
    source = make_source(tmp_path_factory.mktemp("bad_sd1"), "sd1")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(source.kohya.read_bytes()[:200])
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {
        "wrong family": ([str(source.kohya), "diffusers", str(tmp_path / "a"), "--family", "sdxl"],
                         "module lora_te_text_model_encoder_layers_0_mlp_fc1 is not an attention/MLP layer of an sdxl model"),
        "corrupt file": ([str(corrupt), "diffusers", str(tmp_path / "b")], "it may be truncated or corrupt"),
        "output exists": ([str(source.kohya), "diffusers", str(existing)], "already exists"),
        "unknown family": ([str(source.diffusers), "kohya", str(tmp_path / "c.safetensors")], "pass --family"),
    }
    before = sorted(tmp_path.rglob("*"))
    argvs = [["convert", "--lora", lora, "--to", to, "--out", out, *rest] for (lora, to, out, *rest), _ in cases.values()]
    for (case, (_, expect)), result in zip(cases.items(), server.run_many(argvs)):
        stderr = result.stderr.strip()
        assert result.returncode == 2, (case, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expect in stderr, (case, stderr)
        print(f"{case}: {stderr}")
    assert sorted(tmp_path.rglob("*")) == before
