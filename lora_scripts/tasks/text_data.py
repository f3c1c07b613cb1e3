"""The text task's data: the sample builder a config asks for, and the dataset doctor's view of
the rows (`check-data`, and the one-line summary printed before training)."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.data.text_files import read_rows
from lora_scripts.data.text_samples import SampleBuilder, detect_format, template_fields
from lora_scripts.datacheck import Report, check_text_samples
from lora_scripts.errors import UserError
from lora_scripts.tasks.base import DataReport


def make_sample_builder(cfg: TrainConfig, tokenizer, rows) -> SampleBuilder:
    """The sample builder for this config's data layout."""
    fmt = detect_format(rows, cfg.data_format, cfg.prompt_template)
    return SampleBuilder(tokenizer, fmt, cfg.prompt_template, cfg.max_seq_length, cfg.train_on_inputs)


def check_text_rows(builder: SampleBuilder, rows: list, validation_rows: list, token_lengths: list[int] | None = None) -> Report:
    """Doctor findings for text rows as `builder` renders and tokenizes them (`token_lengths`:
    the rows' uncut lengths when already known, else they are tokenized here)."""
    samples = [(*builder.render(row, source), source) for row, source in rows]
    return check_text_samples(
        samples,
        token_lengths=token_lengths or [builder.build(row, source)[1] for row, source in rows],
        max_seq_length=builder.max_seq_length,
        template_fields=template_fields(builder.prompt_template) if builder.data_format == "template" else (),
        raw_rows=[(source, row) for row, source in rows],
        validation_samples=[(*builder.render(row, source), source) for row, source in validation_rows],
    )


def text_data_report(cfg: TrainConfig, embeddings_file: Path | None) -> DataReport:
    """Doctor findings for a text task's data (loads the tokenizer only, not the model)."""
    from lora_scripts.models.llm import load_tokenizer

    if embeddings_file is not None:
        raise UserError("--embeddings applies to image datasets (CLIP style outliers); remove it for text data")
    rows = read_rows(cfg.train_data_dir)
    builder = make_sample_builder(cfg, load_tokenizer(cfg.base_model), rows)
    validation = read_rows(cfg.validation_file) if cfg.validation_file is not None else []
    return DataReport(check_text_rows(builder, rows, validation))
