import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The dequantized-GGUF cache of this test session: the first real-model test fills it, the others
# (and the CLI processes they start, which inherit it) load from it; the user's cache is untouched.
os.environ["LORA_SCRIPTS_CACHE"] = tempfile.mkdtemp(prefix="lora-scripts-cache-")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    from tests.tiny_llm import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
