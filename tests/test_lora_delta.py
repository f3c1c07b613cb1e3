"""`fused_lora`: LoRA layers computed as one product with the merged weight give PEFT's results.

Tolerance: float32 rounding of a different summation order, 1e-5 relative (norm of the
difference over the norm) on outputs and gradients here; measured on the benchmark models: up
to 6e-6 on the SD-shaped UNet, 1.3e-5 on SmolLM2, whose products are longer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lora_scripts.models import lora_delta
from lora_scripts.models.lora_delta import fuse_lora_layers
from tests.helpers import text_config
from tests.image_helpers import image_config, train_in_process, write_dataset
from tests.tiny_sd import make_tiny_sd

OURS = {"_LinearDeltaBackward", "_ConvDeltaBackward"}


class Tiny(nn.Module):
    """A strided 3x3 convolution, a 1x1 convolution and a Linear over the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(12, 12, 1)
        self.head = nn.Linear(12, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.down(x)).movedim(-3, -1))


def tiny_lora(dropout: float = 0.0, dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, target_modules=["down", "mix", "head"])
    model = get_peft_model(Tiny(), config)
    with torch.no_grad():  # B starts at zero; a non-zero B makes the merged weight differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def graph_names(output: torch.Tensor) -> set[str]:
    names, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def output_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[str], dict[str, torch.Tensor]]:
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.detach(), graph_names(out), {"input": x.grad, **grads}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_merged_layers_give_peft_outputs_and_gradients():
    reference = tiny_lora()
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 3
    x = torch.randn(4, 8, 16, 16)
    out, names, grads = output_and_grads(fused, x)
    ref_out, ref_names, ref_grads = output_and_grads(reference, x)
    assert OURS <= names and not OURS & ref_names
    assert relative(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 7  # the input and A, B of three layers
    for name, grad in grads.items():
        assert ref_grads[name].abs().max() > 1e-3, name
        assert relative(grad, ref_grads[name]) < 1e-5, name


def test_peft_forward_wherever_the_shortcut_is_not_the_same_computation():
    reference = tiny_lora()
    model = copy.deepcopy(reference)
    fuse_lora_layers(model)
    x = torch.randn(4, 8, 16, 16)
    with torch.no_grad():  # evaluation and generation: bit for bit PEFT's forward
        assert torch.equal(model(x), reference(x))
    with model.disable_adapter():
        assert not OURS & graph_names(model(x)) and torch.equal(model(x), model.base_model.model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not OURS & graph_names(model(x))
    single = model(x[0])  # an unbatched image: the convolutions take PEFT's path
    assert "_ConvDeltaBackward" not in graph_names(single) and relative(single, reference(x[0])) < 1e-5
    assert not OURS & graph_names(model(torch.randn(1, 8, 2, 2)))  # too few rows to pay for the merge
    assert not OURS & graph_names(copy.deepcopy(model).double()(x.double()))
    for variant in (tiny_lora(dropout=0.1), tiny_lora(dora=True)):
        assert fuse_lora_layers(variant) == 3
        assert not OURS & graph_names(variant(x))


@pytest.mark.parametrize("task", ["image", "text"])
def test_training_with_and_without_fused_lora_writes_the_same_adapter(tmp_path, tiny_llm_dir, task, monkeypatch):
    calls = []
    for function in (lora_delta._LinearDelta, lora_delta._ConvDelta):
        monkeypatch.setattr(function, "apply", lambda *args, apply=function.apply: calls.append(1) or apply(*args))
    files, fused_calls = {}, []
    for fused in (True, False):
        calls.clear()
        folder = tmp_path / str(fused)
        folder.mkdir()
        if task == "image":
            tiny = make_tiny_sd(folder / "models", "sd1")
            write_dataset(folder / "data", [(64, 64)] * 4)
            config = image_config(folder, tiny.diffusers_dir, max_steps=3)
            name = "out/out.safetensors"
        else:
            config = text_config(folder, tiny_llm_dir, max_steps=3)
            name = "out/adapter_model.safetensors"
        train_in_process(config, f"fused_lora={str(fused).lower()}")
        files[fused] = load_file(folder / name)
        fused_calls.append(len(calls))
    assert fused_calls[0] > 0 and fused_calls[1] == 0
    assert files[True].keys() == files[False].keys()
    trained = [k for k in files[True] if "lora_up" in k or "lora_B" in k]
    assert trained and all(files[True][k].abs().max() > 1e-4 for k in trained)
    assert max(relative(files[True][k], files[False][k]) for k in files[True]) < 1e-4
