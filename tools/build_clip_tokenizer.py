"""Rebuild the shipped CLIP tokenizer files (vocab.json, merges.txt, tokenizer_config.json) offline.

CLIP ViT-L/14 (SD1, SDXL text_encoder) and OpenCLIP ViT-H/bigG (SD2, SDXL text_encoder_2) share
one byte-level BPE. open_clip ships it as `bpe_simple_vocab_16e6.txt.gz`; this script turns it
into the Hugging Face `CLIPTokenizer` files the same way open_clip's `SimpleTokenizer.__init__`
builds its vocabulary (256 byte symbols, their `</w>` forms, 48,894 merges, then the two
special tokens = 49,408 ids).

Usage: python tools/build_clip_tokenizer.py [output_dir]
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

NUM_MERGES = 49152 - 256 - 2  # open_clip keeps merges[1 : 49152 - 256 - 2 + 1]
# OpenAI CLIP's special tokens and 77-token context; OpenCLIP models override pad_token with "!"
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "lora_scripts" / "assets" / "clip_tokenizer"


def open_clip_bpe_path() -> Path:
    """Locate open_clip's BPE file without importing open_clip (installed without its deps)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: pip install --no-deps open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def build(output_dir: Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIPTokenizer into output_dir."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (output_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n"
    (output_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    (output_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {output_dir}")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)
