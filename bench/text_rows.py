"""The text benchmark's rows, each run in a fresh process by `bench/row.py`.

- baseline A: PEFT + transformers `Trainer`, as LLaMA-Factory and axolotl build on it: the
  default `DataCollatorForSeq2Seq` (pads each batch to its longest sample), the default random
  sampler, no length grouping, the model's own loss (full logits).
- baseline B: a minimal hand-written PyTorch loop: random batches padded to their longest
  sample, full logits, `F.cross_entropy`.
- lora-scripts: `lora_scripts.loop.train(load_config(...))`, its defaults plus the overrides
  the row names.
All rows train the same LoRA (rank r, alpha = r, no dropout, on q/k/v/o/gate/up/down) on the same
tokens, one epoch, AdamW at a constant learning rate, gradients clipped at 1.0, and are scored
by the same held-out loss afterwards.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import StepClock, peak_device_mib, peak_rss_mib, wall_time
from bench.text_data import load_samples
from lora_scripts.data.text_samples import IGNORE_INDEX

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_gguf(spec: dict[str, Any]) -> dict[str, Any]:
    """Dequantize the GGUF with lora-scripts' loader and save it as a float32 Hugging Face
    folder, from which the baselines load the very same weights."""
    from lora_scripts.models.llm import load_llm

    started = time.perf_counter()
    model, tokenizer = load_llm(spec["gguf"])
    seconds = time.perf_counter() - started
    # transformers keeps its GGUF quantizer on the model and refuses save_pretrained while it is
    # there; the weights are plain float32 tensors by now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(spec["folder"], safe_serialization=True)
    tokenizer.save_pretrained(spec["folder"])
    return {"load_s": seconds}


def matmul_params(folder: str | Path, rank: int) -> dict[str, int]:
    """Weights every token passes through as a matmul: all Linear layers (the LM head included,
    tied or not) and the LoRA matrices on TARGETS. Counted on the meta device (no memory)."""
    from transformers import AutoConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    base = sum(m.weight.numel() for _, m in linears)
    lora = sum(rank * (m.in_features + m.out_features) for name, m in linears if name.rsplit(".", 1)[-1] in TARGETS)
    return {"base": base, "lora": lora}


def _autocast(spec: dict[str, Any]) -> contextlib.AbstractContextManager:
    if spec["precision"] == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(spec["device"], dtype=DTYPES[spec["precision"]])


def _base_model(spec: dict[str, Any]) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=DTYPES[spec["precision"]], local_files_only=True)
    model.config.use_cache = False
    return model.to(spec["device"])


def _with_lora(model: nn.Module, spec: dict[str, Any]) -> PeftModel:
    torch.manual_seed(spec["seed"])
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _pad(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (what DataCollatorForSeq2Seq does too)."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (ids, target) in enumerate(samples):
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), torch.tensor(target), 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _result(clock: StepClock, spec: dict[str, Any], samples: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """Throughput and timing of a finished run. A step is one forward here (no accumulation), so
    step 1 starts at the last model forward before it ends (probes before training are skipped)."""
    start = clock.last_forward_before(clock.ends[0])
    seconds = clock.ends[-1] - start
    tokens = sum(len(ids) for ids, _ in samples)
    cpu_seconds = clock.cpu[clock.ends[-1]] - clock.cpu[start]
    return {
        "steps": len(clock.ends), "samples": len(samples), "tokens": tokens, "train_s": seconds,
        "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(clock.ends), "tokens_per_cpu_s": tokens / cpu_seconds,
        "data_share": clock.waiting_share() if len(clock.ends) > 1 else None,
        "startup_s": wall_time(start) - spec["spawned_at"],
        "peak_rss_mib": peak_rss_mib(), "peak_device_mib": peak_device_mib(),
    }


@torch.no_grad()
def held_out_loss(model: nn.Module, spec: dict[str, Any], pad_id: int) -> float:
    """Mean next-token cross-entropy over the held-out samples' target tokens (same for every row)."""
    model.eval()
    samples = load_samples(spec["eval_samples"])
    total, count = 0.0, 0
    for start in range(0, len(samples), spec["batch"]):
        batch = {k: v.to(spec["device"]) for k, v in _pad(samples[start : start + spec["batch"]], pad_id).items()}
        with _autocast(spec):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def run_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline A: PEFT + transformers Trainer with its defaults."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(spec["folder"], local_files_only=True)
    model = _with_lora(_base_model(spec), spec)
    samples = load_samples(spec["train_samples"])
    dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in samples]
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "trainer"), per_device_train_batch_size=spec["batch"], num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16", remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    with StepClock((nn.Embedding,)) as clock:
        trainer.train()
    result = _result(clock, spec, samples)
    return {**result, "held_out_loss": held_out_loss(model, spec, tokenizer.pad_token_id)}


def run_plain_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline B: the shortest correct loop — random padded batches, full logits, F.cross_entropy."""
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"], local_files_only=True)
    model = _with_lora(_base_model(spec), spec)
    samples = load_samples(spec["train_samples"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    model.train()
    with StepClock((nn.Embedding,)) as clock:
        for start in range(0, len(order), spec["batch"]):
            batch = _pad([samples[i] for i in order[start : start + spec["batch"]]], tokenizer.pad_token_id)
            batch = {k: v.to(spec["device"]) for k, v in batch.items()}
            with _autocast(spec):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result = _result(clock, spec, samples)
    with model.disable_adapter():
        result["held_out_loss_before"] = held_out_loss(model, spec, tokenizer.pad_token_id)
    return {**result, "held_out_loss": held_out_loss(model, spec, tokenizer.pad_token_id)}


def run_lora_scripts(spec: dict[str, Any]) -> dict[str, Any]:
    """lora-scripts through its public entry point, then its saved adapter scored like the others."""
    from lora_scripts.config import load_config
    from lora_scripts.loop import train

    cfg = load_config(spec["config"], spec.get("overrides", []))
    with StepClock((nn.Embedding,)) as clock:
        train(cfg)
    result = _result(clock, spec, load_samples(spec["train_samples"]))
    if spec.get("score", True):
        tokenizer = AutoTokenizer.from_pretrained(spec["folder"], local_files_only=True)
        model = PeftModel.from_pretrained(_base_model(spec), str(cfg.output_dir))
        result["held_out_loss"] = held_out_loss(model, spec, tokenizer.pad_token_id)
    return result
