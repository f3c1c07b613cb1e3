"""Build a tiny random CLIP folder (CLIPModel + CLIPProcessor) that loads like a real download.

The tokenizer is the real CLIP BPE, rebuilt from open_clip's `bpe_simple_vocab_16e6.txt.gz`
the same way open_clip's `SimpleTokenizer` does, so label texts tokenize as with openai/clip.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

IMAGE_SIZE = 32
# open_clip SimpleTokenizer: the file's first line is a header, then 49152 - 256 - 2 merges are used.
_MERGE_COUNT = 49152 - 256 - 2


def _open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip_torch must be installed"
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer() -> CLIPTokenizer:
    """The real 49408-token CLIP BPE tokenizer, built offline from open_clip's vocab file."""
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny CLIPModel and its CLIPProcessor into `folder`."""
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "projection_dim": 16},
        vision_config={**tower, "projection_dim": 16, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder
