"""Packing, per-sample attention and target-only logits (issue 10): the same loss and gradients
as padded batches with full logits, no attention across packed samples, and a model that cannot
keep packed samples apart is trained padded."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from lora_scripts.config import load_config
from lora_scripts.loop import backward_group
from lora_scripts.tasks.text import build_text_task
from lora_scripts.models.packed_attention import BOUNDS_KEY, NAME
from lora_scripts.tasks.text_batches import causal_lm_loss, make_text_collate, model_inputs, packing_works
from tests.helpers import run_cli, text_config

GROUP = [[0, 13, 5, 22], [7, 1]]  # two micro-batches of samples with different lengths


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_llm_dir):
    folder = tmp_path_factory.mktemp("packing")
    cfg = load_config(text_config(folder, tiny_llm_dir, lora_dropout=0.0))
    task = build_text_task(cfg, "cpu")
    with torch.no_grad():  # non-zero B so every LoRA weight gets a gradient
        for name, param in task.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return task


def loss_and_grads(task, packing: bool, targets_only: bool, bounds: bool = False):
    task.collate = make_text_collate(0, packing, bounds)
    task.loss = lambda model, batch: causal_lm_loss(model, batch, targets_only)
    task.model.zero_grad()
    batches = [task.collate([task.train_set[i] for i in group]) for group in GROUP]
    loss, units = backward_group(task.model, task, batches, Accelerator(cpu=True))
    return loss, units, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad}


def test_the_task_trains_with_per_sample_attention(task):
    assert task.model.config._attn_implementation == NAME
    batch = task.collate([task.train_set[0], task.train_set[13]])
    n = len(task.train_set[0].input_ids)
    assert batch[BOUNDS_KEY].tolist() == [0, n, batch["input_ids"].shape[1]]
    one_segment = {**batch, BOUNDS_KEY: torch.tensor([0, batch["input_ids"].shape[1]], dtype=torch.int32)}
    with torch.no_grad():
        right, wrong = (task.model(**model_inputs(b), use_cache=False).logits[0] for b in (batch, one_segment))
    assert (right[:n] - wrong[:n]).abs().max() < 1e-5  # causal: the first sample is the same either way,
    assert (right[n:] - wrong[n:]).abs().max() > 1e-3  # told "one sample", the second sees the first


def test_packed_batches_and_target_logits_give_the_padded_loss_and_gradients(task):
    assert len({len(task.train_set[i].input_ids) for i in GROUP[0]}) > 1
    reference = loss_and_grads(task, packing=False, targets_only=False)
    assert max(g.abs().max().item() for g in reference[2].values()) > 1e-4
    for combo in [(True, True, True), (True, False, True), (True, True, False), (True, False, False), (False, True, False)]:
        loss, units, grads = loss_and_grads(task, *combo)
        assert units == reference[1]
        assert abs(loss - reference[0]) < 1e-5, combo
        assert max((grads[n] - reference[2][n]).abs().max().item() for n in grads) < 1e-5, combo


@pytest.mark.parametrize("bounds", [True, False], ids=["per-sample attention", "block-diagonal mask"])
def test_a_packed_sample_sees_nothing_of_its_neighbours(task, bounds):
    collate = make_text_collate(0, packing=True, bounds=bounds)
    first, second = task.train_set[0], task.train_set[13]
    changed = type(second)([(t + 1) % 1000 for t in second.input_ids], second.labels, second.source)
    with torch.no_grad():
        logits = [task.model(**model_inputs(b), use_cache=False).logits[0]
                  for b in (collate([first, second]), collate([first, changed]), collate([second, first]))]
    n = len(first.input_ids)
    assert torch.equal(logits[0][:n], logits[1][:n])  # the first sample ignores what follows
    assert (logits[0][n:] - logits[1][n:]).abs().max() > 1e-3  # the probe itself is sensitive
    assert (logits[2][len(second.input_ids):] - logits[0][:n]).abs().max() < 1e-5  # and ignores what precedes


class IgnoresPositionIds(nn.Module):
    """A model whose attention runs across the whole row, as an architecture without packed-mask
    support would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_the_start_up_probe_tells_the_two_apart(task):
    samples = [task.train_set[0], task.train_set[13]]
    assert packing_works(task.model, samples, 0) and packing_works(task.model, samples, 0, bounds=True)
    assert not packing_works(IgnoresPositionIds(task.model), samples, 0)


def test_cli_packed_and_padded_runs_train_the_same_adapter(tmp_path, tiny_llm_dir):
    from safetensors.torch import load_file

    results = {}
    for packing in (True, False):
        folder = tmp_path / str(packing)
        folder.mkdir()
        proc = run_cli("train", "--config", str(text_config(folder, tiny_llm_dir, max_steps=4)), "--set", f"packing={str(packing).lower()}")
        assert proc.returncode == 0, proc.stderr
        assert ("packed into one row per micro-batch, attention computed per sample" in proc.stdout) == packing
        results[packing] = load_file(folder / "out" / "adapter_model.safetensors")
    assert results[True].keys() == results[False].keys()
    assert max((results[True][k] - results[False][k]).abs().max().item() for k in results[True]) < 1e-5
    assert max(t.abs().max().item() for k, t in results[True].items() if "lora_B" in k) > 1e-4
