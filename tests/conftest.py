import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    from tests.tiny_llm import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
