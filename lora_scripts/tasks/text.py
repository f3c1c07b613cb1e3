"""Text task: a causal LM with a PEFT LoRA, trained on response tokens."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.data.text_files import read_rows
from lora_scripts.data.text_samples import build_samples, detect_format, split_validation, validate_rows
from lora_scripts.errors import UserError
from lora_scripts.models.llm import check_llm_path
from lora_scripts.models.packed_attention import use_per_sample_attention
from lora_scripts.tasks.base import Progress, Task, TaskRun
from lora_scripts.tasks.lora_plus import lora_param_groups
from lora_scripts.tasks.text_batches import (
    causal_lm_loss,
    count_input_tokens,
    count_target_tokens,
    make_text_collate,
    packing_works,
    supports_logits_to_keep,
)
from lora_scripts.tasks.text_data import check_text_rows, make_sample_builder, text_data_report
from lora_scripts.tasks.text_infer import generate
from lora_scripts.tasks.text_lora import AdapterWriter, check_init_lora, load_base, method_summary, wrap_with_lora


def preflight(cfg: TrainConfig) -> None:
    """Check base model and data paths before loading anything large."""
    check_llm_path(cfg.base_model)
    if "gguf" in cfg.export and Path(cfg.base_model).suffix.lower() != ".gguf":
        raise UserError(
            f"export: gguf needs a .gguf base_model (the adapter's tensors are named after it), not {cfg.base_model}; "
            "train on the model's GGUF, or export later with `lora-scripts export --to gguf --base MODEL.gguf`"
        )
    check_init_lora(cfg)
    for path in filter(None, [cfg.train_data_dir, cfg.validation_file]):
        rows = read_rows(path)
        validate_rows(rows, detect_format(rows, cfg.data_format, cfg.prompt_template), cfg.prompt_template)


def _batch_layout(cfg: TrainConfig, packing: bool, per_sample: bool) -> str:
    if packing:
        return "packed into one row per micro-batch" + (", attention computed per sample" if per_sample else "")
    return "padded rows" + (" (this model's attention cannot keep packed samples apart)" if cfg.packing else "")


def _fingerprint(cfg: TrainConfig, samples: list) -> dict[str, str]:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.input_ids, sample.labels]).encode())
    return {"base_model": str(cfg.base_model), "data": digest.hexdigest()[:16]}


def build_text_task(cfg: TrainConfig, device: str) -> TaskRun:
    """Load model and data, attach LoRA, and return the task for the shared loop."""
    rows = read_rows(cfg.train_data_dir)
    validation_rows = read_rows(cfg.validation_file) if cfg.validation_file is not None else []
    model, tokenizer = load_base(cfg, device)
    builder = make_sample_builder(cfg, tokenizer, rows)
    samples, stats = build_samples(rows, builder)
    data_check = check_text_rows(builder, rows, validation_rows, stats.lengths).summary_line()
    if validation_rows:
        eval_samples, _ = build_samples(validation_rows, builder)
        train_samples = samples
    else:
        train_samples, eval_samples = split_validation(samples, cfg.validation_split, cfg.seed)
    per_sample = cfg.packing and cfg.per_sample_attention and use_per_sample_attention(model)
    packing = cfg.packing and packing_works(model, train_samples, tokenizer.pad_token_id, per_sample)
    targets_only = cfg.target_logits_only and supports_logits_to_keep(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    peft_model = wrap_with_lora(model, cfg)
    trainable, total = peft_model.get_nb_trainable_parameters()
    write_adapter = AdapterWriter(peft_model, cfg)

    def save_adapter(folder: Path, name: str, progress: Progress) -> list[Path]:
        return write_adapter(folder)

    summary = (
        f"{data_check}\n"
        f"data: {stats.summary(cfg.max_seq_length)}; layout `{builder.data_format}`; "
        f"{len(train_samples)} train / {len(eval_samples)} validation samples, {_batch_layout(cfg, packing, per_sample)}. "
        f"{method_summary(cfg)} on {sorted(peft_model.peft_config['default'].target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    return TaskRun(
        model=peft_model,
        train_set=train_samples,
        eval_set=eval_samples,
        collate=make_text_collate(tokenizer.pad_token_id, packing, per_sample),
        loss=functools.partial(causal_lm_loss, targets_only=targets_only),
        count_units=count_target_tokens,
        count_processed=count_input_tokens,
        save_adapter=save_adapter,
        unit_name="tokens",
        fingerprint=_fingerprint(cfg, train_samples),
        summary=summary,
        param_groups=lora_param_groups(peft_model.named_parameters(), cfg.learning_rate, cfg.loraplus_lr_ratio) if cfg.loraplus_lr_ratio else None,
    )


def export_gguf(cfg: TrainConfig) -> list[str]:
    """The finished adapter as a llama.cpp GGUF adapter, `<output_name>.gguf` in output_dir."""
    from lora_scripts.export.gguf_adapter import export_gguf_adapter, gguf_adapter_usage

    base, out = Path(cfg.base_model), cfg.output_dir / f"{cfg.effective_output_name}.gguf"
    export_gguf_adapter(cfg.output_dir, base, out)
    return [f"GGUF adapter written to {out}", gguf_adapter_usage(out, base, cfg.output_dir)]


TASK = Task(name="text-generation", preflight=preflight, build=build_text_task, data_report=text_data_report,
            generate=generate, exports={"gguf": export_gguf})
