"""`lora-scripts resize` and `merge-loras` on real kohya files (with LoCon 3x3 convs) and PEFT
folders: full rank is lossless and loads to the source's outputs, lower ranks report the energy an
independent SVD says they keep, and the concat merge is exactly the weighted sum of the updates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.forkserver import ForkServer
from tests.lora_fixtures import kohya_deltas, make_image_loras, make_peft_adapter, peft_deltas
from tests.test_kohya_format import outputs
from tests.tiny_sd import single_torch_thread  # noqa: F401  (autouse fixture)

MODULE_LINE = re.compile(r"^  (\S+)  rank (\d+) -> (\d+)  energy ([0-9.]+)$", re.M)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = ForkServer(["lora_scripts.export.merge_loras"], tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image_loras(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llm_dir) -> Path:
    return make_peft_adapter(tiny_llm_dir, tmp_path_factory.mktemp("text") / "plain", r=12, lora_alpha=24)


def run_ok(cli: ForkServer, *argv: str) -> str:
    result = cli.run(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def energies(singular_values: torch.Tensor, rank: int) -> float:
    squares = singular_values.square()
    return float(squares[:rank].sum() / squares.sum())


def diffusers_outputs(base: Path, *loras: tuple[Path, float]) -> list[torch.Tensor]:
    """UNet and text encoder outputs of the pipeline with `loras` loaded at their weights."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    for index, (lora, _) in enumerate(loras):
        pipe.load_lora_weights(lora, adapter_name=f"l{index}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    return outputs(pipe.unet, [pipe.text_encoder], "sd1")


def test_kohya_resize_to_full_rank_is_lossless(cli, image, tmp_path):
    out = tmp_path / "full.safetensors"
    printed = run_ok(cli, "resize", "--lora", str(image.kohya_a), "--rank", "4", "--out", str(out))
    assert "min 1.000000" in printed
    source, resized = kohya_deltas(image.kohya_a), kohya_deltas(out)
    assert source.keys() == resized.keys()
    worst = max(float((resized[name] - delta).abs().max()) for name, delta in source.items())
    assert worst < 1e-5, worst
    for got, expected in zip(diffusers_outputs(image.base, (out, 1.0)), diffusers_outputs(image.base, (image.kohya_a, 1.0))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_kohya_resize_to_lower_rank_reports_the_energy_kept(cli, image, tmp_path):
    out = tmp_path / "r2.safetensors"
    printed = run_ok(cli, "resize", "--lora", str(image.kohya_a), "--rank", "2", "--out", str(out), "--per-module")
    reported = {name: (int(old), int(new), float(energy)) for name, old, new, energy in MODULE_LINE.findall(printed)}
    source, resized = kohya_deltas(image.kohya_a), kohya_deltas(out)
    assert reported.keys() == source.keys()
    for name, delta in source.items():
        expected = energies(torch.linalg.svdvals(delta), 2)
        old, new, energy = reported[name]
        assert (new, abs(energy - expected) < 2e-6) == (2, True), (name, energy, expected)
        # Eckart-Young: the best rank-2 approximation misses exactly the energy not kept
        missed = float((resized[name] - delta).square().sum() / delta.square().sum())
        assert abs(missed - (1 - expected)) < 1e-6, (name, missed, expected)
    te = [energy for name, (old, _, energy) in reported.items() if name.startswith("lora_te_")]
    assert te and all(e == 1.0 for e in te)  # the text encoder was rank 2 already
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
    assert alphas == {4.0, 3.0}  # kohya's convention: alpha = old scale * new rank (8/4*2, 3/2*2)
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_steps"] == "120" and "resized from 2/4 to 2" in metadata["ss_training_comment"]


def test_peft_resize_loads_in_peft(cli, adapter, tiny_llm_dir, tmp_path):
    ids = torch.tensor([[1, 20, 300, 4000, 50, 600, 7]])

    def logits(folder: Path) -> torch.Tensor:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), folder).eval()
        with torch.no_grad():
            return model(ids).logits

    run_ok(cli, "resize", "--lora", str(adapter), "--rank", "16", "--out", str(tmp_path / "full"))
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (12, 24, {})  # capped at its own rank
    torch.testing.assert_close(logits(tmp_path / "full"), logits(adapter), atol=1e-5, rtol=0)

    printed = run_ok(cli, "resize", "--lora", str(adapter), "--rank", "4", "--out", str(tmp_path / "r4"), "--per-module")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)  # same scale 2
    reported = {name: float(energy) for name, _, _, energy in MODULE_LINE.findall(printed)}
    source, resized = peft_deltas(adapter, 24), peft_deltas(tmp_path / "r4", 8)
    for name, delta in source.items():
        assert abs(reported[name] - energies(torch.linalg.svdvals(delta), 4)) < 2e-6
        missed = float((resized[name] - delta).square().sum() / delta.square().sum())
        assert abs(missed - (1 - reported[name])) < 1e-5
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), tmp_path / "r4").merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    q_proj = "model.layers.0.self_attn.q_proj"
    applied = merged.get_submodule(q_proj).weight - base.get_submodule(q_proj).weight
    torch.testing.assert_close(applied.double(), resized[f"base_model.model.{q_proj}"], atol=1e-6, rtol=0)


def test_concat_merge_is_the_weighted_sum(cli, image, tmp_path):
    out = tmp_path / "merged.safetensors"
    printed = run_ok(cli, "merge-loras", "--lora", f"{image.kohya_a}:0.7", "--lora", f"{image.kohya_b}:0.3", "--out", str(out))
    assert "exact" in printed
    a, b, merged = kohya_deltas(image.kohya_a), kohya_deltas(image.kohya_b), kohya_deltas(out)
    assert merged.keys() == a.keys() == b.keys()
    worst = max(float((merged[name] - (0.7 * a[name] + 0.3 * b[name])).abs().max()) for name in a)
    assert worst < 1e-5, worst
    with safe_open(out, "pt") as handle:
        ranks = {handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.endswith(".lora_down.weight")}
    assert ranks == {4 + 2, 2 + 3}
    together = diffusers_outputs(image.base, (image.kohya_a, 0.7), (image.kohya_b, 0.3))
    for got, expected in zip(diffusers_outputs(image.base, (out, 1.0)), together):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_svd_merge_to_a_rank(cli, image, tmp_path):
    out = tmp_path / "merged_r3.safetensors"
    printed = run_ok(cli, "merge-loras", "--lora", f"{image.kohya_a}:0.7", "--lora", f"{image.kohya_b}:-0.3", "--out", str(out), "--rank", "3")
    a, b, merged = kohya_deltas(image.kohya_a), kohya_deltas(image.kohya_b), kohya_deltas(out)
    kept = []
    for name in a:
        target = 0.7 * a[name] - 0.3 * b[name]
        kept.append(energies(torch.linalg.svdvals(target), 3))
        missed = float((merged[name] - target).square().sum() / target.square().sum())
        assert abs(missed - (1 - kept[-1])) < 1e-6, name
    summary = re.search(r"min ([0-9.]+), mean ([0-9.]+)", printed)
    assert abs(float(summary[1]) - min(kept)) < 2e-6 and abs(float(summary[2]) - sum(kept) / len(kept)) < 2e-6


@pytest.mark.parametrize("case, expect", [
    ("output_exists", "already exists"),
    ("rank_zero", "needs rank 1 or more"),
    ("mixed_formats", "different formats (kohya, peft)"),
    ("dora", "this is DoRA"),
    ("corrupt", "not a readable .safetensors file"),
])
def test_bad_input_writes_nothing(cli, image, adapter, tiny_llm_dir, tmp_path, case, expect):
    out = tmp_path / ("existing.safetensors" if case == "output_exists" else "out.safetensors")
    lora = str(image.kohya_a)
    if case == "output_exists":
        out.write_bytes(b"keep me")
    if case == "dora":
        lora, out = str(make_peft_adapter(tiny_llm_dir, tmp_path / "dora", r=4, use_dora=True)), tmp_path / "out"
    if case == "corrupt":
        (tmp_path / "cut.safetensors").write_bytes(image.kohya_a.read_bytes()[:3000])
        lora = str(tmp_path / "cut.safetensors")
    argv = {
        "mixed_formats": ["merge-loras", "--lora", f"{image.kohya_a}:0.5", "--lora", f"{adapter}:0.5", "--out", str(out)],
        "rank_zero": ["resize", "--lora", lora, "--rank", "0", "--out", str(out)],
    }.get(case, ["resize", "--lora", lora, "--rank", "2", "--out", str(out)])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli.run(*argv)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expect in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output_exists":
        assert out.read_bytes() == b"keep me"
