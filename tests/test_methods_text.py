"""The text LoRA methods (DoRA, rsLoRA with rank/alpha patterns, LoRA+, PiSSA, OLoRA, gaussian
init), each trained through the CLI on the tiny Llama: PEFT loads the adapter on the untouched
base and gives the trained model's outputs; a run killed mid-way and resumed ends bit-identical
to an uninterrupted one; incremental training, generate, check-data and inspect know each method.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from accelerate.utils import set_seed
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_scripts.checkpoint import load_trainable_state
from lora_scripts.config import load_config, validate_config
from lora_scripts.errors import UserError
from lora_scripts.export.lora_info import describe
from lora_scripts.tasks.text import build_text_task
from lora_scripts.tasks.text_lora import load_base_4bit
from tests.forkserver import ForkServer
from tests.helpers import text_config

METHODS = {
    "dora": dict(use_dora=True),
    "rslora_patterns": dict(use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 8}),
    "loraplus": dict(loraplus_lr_ratio=16),
    "pissa": dict(init_lora_weights="pissa"),
    "pissa_niter": dict(init_lora_weights="pissa_niter_2"),  # randomized SVD: a resume must redraw the same init
    "olora": dict(init_lora_weights="olora"),
    "gaussian": dict(init_lora_weights="gaussian"),
}
RESUMED = ("dora", "rslora_patterns", "loraplus", "pissa", "pissa_niter")  # olora, gaussian: as pissa, plain LoRA
# 24 rows in micro-batches of 2, 2 per step, 4 steps, a checkpoint every 2; dropout draws random numbers
COMMON = dict(max_steps=4, save_steps=2, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, learning_rate="5e-3")
IDS = torch.tensor([[1, 200, 300, 400, 500, 600]])
RESULTS: dict[str, float] = {}  # largest PEFT-vs-trained logit difference per method, printed at the end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork = ForkServer(["lora_scripts.tasks.text"], tmp_path_factory.mktemp("fork"))
    yield fork
    fork.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llm_dir, server):
    """Per method: an uninterrupted run, and one SIGKILLed after step 3 then resumed."""
    root = tmp_path_factory.mktemp("methods")
    configs = {}
    for name, keys in METHODS.items():
        for kind in ("straight", "crashed"):
            folder = root / name / kind
            folder.mkdir(parents=True)
            configs[name, kind] = text_config(folder, tiny_llm_dir, **COMMON, **keys)
        proc = server.train_ok(configs[name, "straight"])
        assert "LoRA r=4" in proc.stdout
        if name in RESUMED:
            server.train_ok(configs[name, "crashed"], fault="kill_after_step:3")
            server.train_ok(configs[name, "crashed"], "resume=true")
    yield configs
    if RESULTS:
        print("\nPEFT on the untouched base vs the trained model, largest logit difference:",
              ", ".join(f"{k}: {v:.2g}" for k, v in RESULTS.items()), file=sys.stderr)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def trained_model(config, tmp_path):
    """The model as training left it at step 4: the run's own build (same seed, so PiSSA/OLoRA
    compute the same init and residual base) plus the LoRA parameters the loop checkpointed."""
    cfg = load_config(config)
    set_seed(cfg.seed)
    task = build_text_task(cfg.model_copy(update={"output_dir": tmp_path}), "cpu")
    load_trainable_state(task.model, load_file(cfg.output_dir / "step_4" / "lora_params.safetensors"))
    return task.model


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_each_method_on_the_untouched_base_with_the_trained_outputs(method, runs, tiny_llm_dir, tmp_path):
    out = runs[method, "straight"].parent / "out"
    expected = logits(trained_model(runs[method, "straight"], tmp_path))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llm_dir))
    loaded = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), str(out)))
    RESULTS[method] = float((loaded - expected).abs().max())
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)
    assert float((expected - base).abs().max()) > 1e-3  # training moved the model

    config = json.loads((out / "adapter_config.json").read_text())
    info = describe(out)
    verdicts = {name: verdict["ok"] for name, verdict in info["runs_in"].items()}
    if method == "dora":
        assert config["use_dora"] and info["method"] == "dora"
        assert verdicts == {"peft": True, "vllm": False, "llama.cpp": False}
        assert "DoRA" in info["runs_in"]["vllm"]["why"]
    elif method == "rslora_patterns":
        shapes = {key: value.shape for key, value in load_file(out / "adapter_model.safetensors").items()}
        assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][0] == 2
        assert shapes["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"][0] == 4
        assert (config["use_rslora"], config["rank_pattern"], config["alpha_pattern"]) == (True, {"down_proj": 2}, {"q_proj": 8})
        assert info["method"] == "rslora" and not verdicts["vllm"]
        assert "vLLM applies lora_alpha / r to every module" in info["runs_in"]["vllm"]["why"]
    elif method.startswith(("pissa", "olora")):
        # PEFT's conversion: delta = BA - B0A0 as a plain LoRA of rank 2r and alpha 2 * alpha (rsLoRA: sqrt(2))
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 8.0, True)
        initial = json.loads((out / "lora_init" / "adapter_config.json").read_text())
        assert initial["r"] == 4 and (out / "lora_init" / "adapter_model.safetensors").is_file()
        assert info["method"] == "lora" and verdicts["vllm"] and info["training"]["init_lora_weights"] == METHODS[method]["init_lora_weights"]
    else:
        assert (config["r"], config["use_dora"], config["use_rslora"]) == (4, False, False) and verdicts["vllm"]


@pytest.mark.parametrize("method", RESUMED)
def test_a_killed_run_resumed_ends_bit_identical(method, runs):
    straight, crashed = (runs[method, kind].parent / "out" for kind in ("straight", "crashed"))
    for relative in ("adapter_model.safetensors", "step_4/lora_params.safetensors"):
        want, got = load_file(straight / relative), load_file(crashed / relative)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[key], got[key]) for key in want), f"{method} {relative}"
    halfway = load_file(crashed / "step_2" / "lora_params.safetensors")
    final = load_file(crashed / "step_4" / "lora_params.safetensors")
    assert not all(torch.equal(halfway[key], final[key]) for key in final)  # steps 3-4 did train


def test_loraplus_trains_b_at_ratio_times_the_learning_rate(runs):
    state = torch.load(runs["loraplus", "straight"].parent / "out" / "step_4" / "optimizer.pt", weights_only=True)
    assert [group["initial_lr"] for group in state["optimizer"]["param_groups"]] == [5e-3, 5e-3 * 16]  # before the schedule
    assert [len(group["params"]) for group in state["optimizer"]["param_groups"]] == [14, 14]  # A and B of 2 x 7 layers


def test_incremental_training_continues_a_method_adapter(runs, tiny_llm_dir, server, tmp_path):
    dora_out = runs["dora", "straight"].parent / "out"
    wrong = text_config(tmp_path, tiny_llm_dir, init_lora_weights=str(dora_out), output_dir=str(tmp_path / "wrong"))
    proc = server.run("train", "--config", str(wrong))
    assert proc.returncode == 2 and "was trained with use_dora: true; set use_dora: true" in proc.stderr

    pissa_out = runs["pissa", "straight"].parent / "out"
    for name, source, keys in [("dora", dora_out, dict(use_dora=True)), ("pissa", pissa_out, dict(lora_rank=8, lora_alpha=8))]:
        folder = tmp_path / name
        folder.mkdir()
        config = text_config(folder, tiny_llm_dir, init_lora_weights=str(source), max_steps=1, learning_rate=1e-12, **keys)
        server.train_ok(config)
        before, after = load_file(source / "adapter_model.safetensors"), load_file(folder / "out" / "adapter_model.safetensors")
        assert before.keys() == after.keys()
        assert max(float((before[key] - after[key]).abs().max()) for key in before) < 1e-6


def test_generate_and_check_data_work_with_a_method_config(runs, server):
    config = runs["pissa", "straight"]
    proc = server.run("generate", "--config", str(config), "--prompt", "1 加 1 等于几？", "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.startswith(">>> 1 加 1 等于几？\n"), proc.stderr[-2000:]
    proc = server.run("check-data", "--config", str(runs["dora", "straight"]))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_method_keys_that_cannot_work_together_are_refused(tiny_llm_dir, server, tmp_path):
    config = text_config(tmp_path, tiny_llm_dir, init_lora_weights="pissa", use_dora=True, conv_dim=4)
    proc = server.run("train", "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "conv_dim is for the image task only; remove it" in proc.stderr
    assert "init_lora_weights pissa is saved converted to a plain LoRA, which cannot hold DoRA's magnitudes" in proc.stderr
    keys = dict(base_model=str(tiny_llm_dir), train_data_dir="d", output_dir="o")
    for bad, message in [
        (dict(init_lora_weights="pissa_niter_0"), "init_lora_weights pissa_niter_0: not found"),  # not a method word: a path
        (dict(use_rslora=True, rank_pattern={"q_proj": 2}, init_lora_weights="olora"), "PEFT cannot convert a olora adapter"),
        (dict(load_in_4bit=True, init_lora_weights="pissa"), "rewrites the base weights, which a 4-bit base cannot hold"),
        (dict(use_dora=True, export=["gguf"]), "llama.cpp cannot apply DoRA"),
    ]:
        try:
            cfg = validate_config({**keys, **bad})
        except UserError as exc:
            assert message in str(exc)
        else:  # a path that does not exist: preflight says so
            proc = server.run("train", "--config", str(text_config(tmp_path, tiny_llm_dir, output_dir=str(tmp_path / "p"), **bad)))
            assert cfg.init_lora_path is not None and message in proc.stderr


def test_qlora_without_bitsandbytes_says_what_to_install(tiny_llm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed (import raises ImportError)
    with pytest.raises(UserError, match=r"load_in_4bit \(QLoRA\) needs bitsandbytes, which is not installed: pip install bitsandbytes==0\.50\.2"):
        load_base_4bit(str(tiny_llm_dir), "cpu")
