"""Bad configs and bad text data: one clear line, non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import pytest

from lora_scripts.config import load_config, schema_markdown
from tests.helpers import REPO, run_cli, write_config, write_qa_jsonl

SPEC_CONFIG = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""


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


def _write_case(tmp_path, body: str):
    path = tmp_path / "c.yaml"
    path.write_text(body, encoding="utf-8")
    return path


CONFIG_CASES = [
    ("lora_rnak: 8\n", "unknown key `lora_rnak`; did you mean `lora_rank`?"),
    ("batch_sise: 8\n", "did you mean `batch_size`?"),
    ("lora_rank: eight\n", "`lora_rank` = 'eight'"),
    ("lora_rank: 0\n", "`lora_rank` = 0: Input should be greater than or equal to 1"),
    ("learning_rate: -1\n", "`learning_rate` = -1"),
    ("mixed_precision: fp8\n", "`mixed_precision` = 'fp8'"),
    ("epochs: 1.5\n", "`epochs` = 1.5"),
    ("task_type: audio\n", "`task_type` = 'audio'"),
]


@pytest.mark.parametrize("extra,message", CONFIG_CASES)
def test_bad_config_keys(tmp_path, extra, message):
    proc = run_cli("train", "--config", str(_write_case(tmp_path, SPEC_CONFIG + extra)))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_missing_required_key_and_bad_yaml(tmp_path):
    proc = run_cli("train", "--config", str(_write_case(tmp_path, "lora_rank: 4\n")))
    assert proc.returncode == 2 and "missing required key `base_model`" in proc.stderr
    proc = run_cli("train", "--config", str(_write_case(tmp_path, "lora_rank: [4\n")))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    proc = run_cli("train", "--config", str(_write_case(tmp_path, SPEC_CONFIG)), "--set", "lora_rank")
    assert proc.returncode == 2 and "expected key=value" in proc.stderr


def _text_case(tmp_path, tiny_llm_dir, **keys):
    base = dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(write_qa_jsonl(tmp_path / "qa.jsonl")),
                prompt_template="问：{question}\n答：{answer}", output_dir=str(tmp_path / "out"))
    base.update(keys)
    return write_config(tmp_path / "c.yaml", **base)


def _bad_file(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case,message", [
    ("ggml", "GGML v3 file"),
    ("missing_model", "base_model not found"),
    ("hub_id", "huggingface-cli download HuggingFaceTB/SmolLM2-135M"),
    ("not_gguf", "not a GGUF file"),
    ("broken_jsonl", "qa_bad.jsonl:2: broken JSON line"),
    ("csv_columns", "prompt_template field(s) ['question', 'answer'] not in the row's columns ['a', 'q']"),
    ("csv_encoding", "not UTF-8 text"),
    ("empty_dir", "no .csv, .json or .jsonl files found"),
    ("output_is_file", "is a file; choose a folder path"),
    ("no_layout", "cannot tell the data layout from columns"),
])
def test_bad_text_inputs(tmp_path, tiny_llm_dir, case, message):
    keys: dict = {}
    if case == "ggml":
        keys["base_model"] = str(_bad_file(tmp_path, "llama-2-7b-chat.ggmlv3.q4_0.bin", b"tjgg" + b"\0" * 64))
    elif case == "missing_model":
        keys["base_model"] = str(tmp_path / "models" / "nothing")
    elif case == "hub_id":
        keys["base_model"] = "HuggingFaceTB/SmolLM2-135M"
    elif case == "not_gguf":
        keys["base_model"] = str(_bad_file(tmp_path, "model.gguf", b"PK\3\4" + b"\0" * 64))
    elif case == "broken_jsonl":
        keys["train_data_dir"] = str(_bad_file(tmp_path, "qa_bad.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "a", \n'))
    elif case == "csv_columns":
        keys["train_data_dir"] = str(_bad_file(tmp_path, "qa.csv", "q,a\n你好,世界\n".encode()))
    elif case == "csv_encoding":
        keys["train_data_dir"] = str(_bad_file(tmp_path, "qa.csv", "question,answer\n你好,世界\n".encode("gbk")))
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        keys["train_data_dir"] = str(tmp_path / "empty")
    elif case == "output_is_file":
        keys["output_dir"] = str(_bad_file(tmp_path, "out.txt", b"x"))
    elif case == "no_layout":
        keys["prompt_template"] = None
    proc = run_cli("train", "--config", str(_text_case(tmp_path, tiny_llm_dir, **keys)))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if case != "output_is_file":
        assert not (tmp_path / "out").exists()  # nothing written


def test_existing_run_is_never_overwritten(tmp_path, tiny_llm_dir):
    config = _text_case(tmp_path, tiny_llm_dir, max_steps=1, lora_rank=2)
    assert run_cli("train", "--config", str(config)).returncode == 0
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "resume: true" in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "train", "--config", str(_write_case(tmp_path, SPEC_CONFIG + "lora_rnak: 1\n")))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config(path)
