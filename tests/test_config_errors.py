"""Config loading and the guard against overwriting a run; the bad-input cases live in
tests/bad_inputs/ (run by test_bad_inputs.py)."""

from __future__ import annotations

import pytest

from lora_scripts.config import load_config, schema_markdown
from tests.helpers import REPO, SPEC_BASE_MODEL, run_cli, write_config, write_qa_jsonl
from tests.helpers import SPEC_CONFIG as SPEC_TEMPLATE

SPEC_CONFIG = SPEC_TEMPLATE.format(base_model=SPEC_BASE_MODEL)


def test_spec_config_validates_verbatim(tmp_path):
    path = tmp_path / "my_lora_config.yaml"
    path.write_text(SPEC_CONFIG, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML reads `2e-4` as a string
    assert cfg.task_type == "image" and cfg.lora_alpha == 8 and cfg.effective_output_name == "my_style_lora"


def test_overrides_parse_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SPEC_CONFIG, encoding="utf-8")
    cfg = load_config(path, ["lora_rank=16", "epochs=3", "learning_rate=1e-3", "resume=true"])
    assert (cfg.lora_rank, cfg.epochs, cfg.learning_rate, cfg.resume) == (16, 3, 1e-3, True)


def test_schema_documents_every_key():
    text = schema_markdown()
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == text, "regenerate: lora-scripts config --schema > docs/config.md"
    from lora_scripts.config import TrainConfig

    for key in TrainConfig.model_fields:
        assert f"`{key}`" in text


def _text_case(tmp_path, tiny_llm_dir, **keys):
    base = dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(write_qa_jsonl(tmp_path / "qa.jsonl")),
                prompt_template="问：{question}\n答：{answer}", output_dir=str(tmp_path / "out"))
    base.update(keys)
    return write_config(tmp_path / "c.yaml", **base)


def test_existing_run_is_never_overwritten(tmp_path, tiny_llm_dir):
    config = _text_case(tmp_path, tiny_llm_dir, max_steps=1, lora_rank=2)
    assert run_cli("train", "--config", str(config)).returncode == 0
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "resume: true" in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config(path)
