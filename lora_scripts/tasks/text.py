"""Text task: a causal LM with a PEFT LoRA, trained on response tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from lora_scripts.config import TrainConfig
from lora_scripts.data.text_files import read_rows
from lora_scripts.data.text_samples import IGNORE_INDEX, build_samples, detect_format, make_collate, split_validation, validate_rows
from lora_scripts.errors import UserError, read_json
from lora_scripts.models.llm import check_llm_path, load_llm
from lora_scripts.models.precision import compute_dtype
from lora_scripts.tasks.base import Batch, Progress, Task, TaskRun
from lora_scripts.tasks.text_data import check_text_rows, make_sample_builder, text_data_report
from lora_scripts.tasks.text_infer import generate

BLOCK_CONTAINERS = (".layers.", ".h.", ".blocks.")


def preflight(cfg: TrainConfig) -> None:
    """Check base model and data paths before loading anything large."""
    check_llm_path(cfg.base_model)
    if cfg.init_lora_weights is not None:
        check_init_lora(cfg.init_lora_weights, cfg.lora_rank)
    for path in filter(None, [cfg.train_data_dir, cfg.validation_file]):
        rows = read_rows(path)
        validate_rows(rows, detect_format(rows, cfg.data_format, cfg.prompt_template), cfg.prompt_template)


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (not the LM head or embeddings)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part in f".{name}." for part in BLOCK_CONTAINERS)
    }
    if not names:
        raise UserError("could not find linear layers inside transformer blocks; set target_modules explicitly")
    return sorted(names)


def wrap_with_lora(model: nn.Module, cfg: TrainConfig) -> PeftModel:
    """Wrap the base model with a fresh LoRA, or with the one named by `init_lora_weights`:
    a PEFT adapter folder, or a PEFT `adapter_model.safetensors` file (shaped by this config)."""
    source = cfg.init_lora_weights
    if source is not None and source.is_dir():
        return _load_adapter_folder(model, cfg, source)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or default_target_modules(model),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if source is not None:
        _load_adapter_file(peft_model, cfg, source)
    return peft_model


def check_init_lora(source: Path, lora_rank: int) -> None:
    """Cheap checks of `init_lora_weights`: it exists, is a PEFT adapter, and has our rank."""
    if source.is_dir():
        config_file = source / "adapter_config.json"
        if not config_file.is_file():
            raise UserError(f"init_lora_weights {source}: not a PEFT adapter folder (no adapter_config.json)")
        rank = read_json(config_file, "init_lora_weights").get("r")
    elif source.is_file() and source.suffix == ".safetensors":
        try:
            with safe_open(str(source), "pt") as handle:
                ranks = {handle.get_slice(k).get_shape()[0] for k in handle.keys() if "lora_A" in k}
        except (OSError, SafetensorError) as exc:
            raise UserError(f"init_lora_weights {source}: not a readable safetensors file ({exc})") from None
        if not ranks:
            raise UserError(f"init_lora_weights {source}: holds no PEFT LoRA weights (no `lora_A` keys)")
        rank = sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)
    else:
        raise UserError(f"init_lora_weights {source}: not found; expected a PEFT adapter folder or an adapter .safetensors file")
    if rank != lora_rank:
        raise UserError(f"init_lora_weights {source}: rank {rank} differs from lora_rank {lora_rank}; set lora_rank: {rank}")


def _load_adapter_folder(model: nn.Module, cfg: TrainConfig, source: Path) -> PeftModel:
    try:
        return PeftModel.from_pretrained(model, str(source), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"init_lora_weights {source}: does not fit base_model {cfg.base_model} ({str(exc).splitlines()[0]})") from None


def _load_adapter_file(peft_model: PeftModel, cfg: TrainConfig, source: Path) -> None:
    try:
        result = set_peft_model_state_dict(peft_model, load_file(str(source)))
    except RuntimeError as exc:
        raise UserError(f"init_lora_weights {source}: does not fit base_model {cfg.base_model} ({str(exc).splitlines()[0]})") from None
    if result.unexpected_keys:
        raise UserError(f"init_lora_weights {source}: {len(result.unexpected_keys)} weights match no module of base_model {cfg.base_model} (e.g. {result.unexpected_keys[0]})")


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss


def count_target_tokens(batch: Batch) -> int:
    """Tokens that carry loss (labels shifted by one, as the loss sees them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_tokens(batch: Batch) -> int:
    """Non-padding tokens fed to the model (the tokens/s figure)."""
    return int(batch["attention_mask"].sum())


def _fingerprint(cfg: TrainConfig, samples: list) -> dict[str, str]:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.input_ids, sample.labels]).encode())
    return {"base_model": str(cfg.base_model), "data": digest.hexdigest()[:16]}


def build_text_task(cfg: TrainConfig, device: str) -> TaskRun:
    """Load model and data, attach LoRA, and return the task for the shared loop."""
    rows = read_rows(cfg.train_data_dir)
    validation_rows = read_rows(cfg.validation_file) if cfg.validation_file is not None else []
    model, tokenizer = load_llm(cfg.base_model, compute_dtype(cfg.mixed_precision, device))
    builder = make_sample_builder(cfg, tokenizer, rows)
    samples, stats = build_samples(rows, builder)
    data_check = check_text_rows(builder, rows, validation_rows, stats.lengths).summary_line()
    if validation_rows:
        eval_samples, _ = build_samples(validation_rows, builder)
        train_samples = samples
    else:
        train_samples, eval_samples = split_validation(samples, cfg.validation_split, cfg.seed)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    peft_model = wrap_with_lora(model, cfg)
    trainable, total = peft_model.get_nb_trainable_parameters()

    def save_adapter(folder: Path, name: str, progress: Progress) -> list[Path]:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        return [folder / "adapter_config.json", folder / "adapter_model.safetensors"]

    summary = (
        f"{data_check}\n"
        f"data: {stats.summary(cfg.max_seq_length)}; layout `{builder.data_format}`; "
        f"{len(train_samples)} train / {len(eval_samples)} validation samples. "
        f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {sorted(peft_model.peft_config['default'].target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    return TaskRun(
        model=peft_model,
        train_set=train_samples,
        eval_set=eval_samples,
        collate=make_collate(tokenizer.pad_token_id),
        loss=causal_lm_loss,
        count_units=count_target_tokens,
        count_processed=count_input_tokens,
        save_adapter=save_adapter,
        unit_name="tokens",
        fingerprint=_fingerprint(cfg, train_samples),
        summary=summary,
    )


TASK = Task(name="text-generation", preflight=preflight, build=build_text_task, data_report=text_data_report, generate=generate)
