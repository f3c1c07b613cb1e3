"""The dequantized-GGUF cache (issue 10): the second load of a GGUF base comes from a float32 copy
keyed by the file's content and gives the very same model."""

from __future__ import annotations

import shutil

import pytest
import torch

from lora_scripts.models.gguf_cache import cached_copy, dequantized_folder
from lora_scripts.models.llm import load_llm
from tests.tiny_llm import SMOLLM2_GGUF


@pytest.mark.slow
def test_second_load_comes_from_the_cache_and_equals_the_first(tmp_path, capsys):
    gguf_file = tmp_path / SMOLLM2_GGUF.name
    shutil.copy(SMOLLM2_GGUF, gguf_file)
    flip_byte(gguf_file, -1)  # content of our own (the cache is keyed by content): its cache starts empty
    assert cached_copy(gguf_file) is None
    first, tokenizer = load_llm(str(gguf_file))
    assert "dequantized weights cached in" in capsys.readouterr().out
    folder = cached_copy(gguf_file)
    assert folder == dequantized_folder(gguf_file) and (folder / "model.safetensors").is_file()

    second, _ = load_llm(str(gguf_file))
    assert capsys.readouterr().out == ""  # nothing dequantized, nothing written
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    flip_byte(gguf_file, -2)  # a changed file gets a cache of its own (flipping -1 again would restore it)
    assert dequantized_folder(gguf_file) != folder and cached_copy(gguf_file) is None


def flip_byte(path, offset_from_end: int) -> None:
    """Change one byte of tensor data (near the end of the last tensor): the file still loads."""
    with path.open("r+b") as fh:
        fh.seek(offset_from_end, 2)
        value = fh.read(1)[0]
        fh.seek(offset_from_end, 2)
        fh.write(bytes([value ^ 1]))
