"""Checks on captions: longer than CLIP reads, one caption shared by most images, tag counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import regex

from lora_scripts.data.image_index import ImageRecord
from lora_scripts.datacheck.report import Finding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# CLIP's text encoder reads 77 tokens, of which <|startoftext|> and <|endoftext|> take two.
CLIP_CONTEXT_LENGTH = 77
CLIP_CAPTION_TOKENS = CLIP_CONTEXT_LENGTH - 2
# CLIP's pre-tokenizer (openai/CLIP simple_tokenizer.py): BPE splits each piece into >= 1 token,
# so counting pieces gives a lower bound of the real token count.
_CLIP_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@dataclass(frozen=True)
class TokenCount:
    """How many CLIP tokens a caption has and the text beyond token 75 that CLIP never sees."""

    count: int
    cut_text: str
    exact: bool  # False: counted with CLIP's pre-tokenizer pattern, a lower bound


def count_clip_tokens(caption: str, tokenizer: PreTrainedTokenizerBase | None = None) -> TokenCount:
    """Count the caption's tokens with `tokenizer` (a transformers CLIPTokenizer), else approximately."""
    if tokenizer is not None:
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        return TokenCount(len(ids), tokenizer.decode(ids[CLIP_CAPTION_TOKENS:]).strip(), True)
    pieces = list(_CLIP_PIECES.finditer(caption.lower()))
    cut = caption[pieces[CLIP_CAPTION_TOKENS].start():].strip() if len(pieces) > CLIP_CAPTION_TOKENS else ""
    return TokenCount(len(pieces), cut, False)


def caption_too_long(records: list[ImageRecord], tokenizer: PreTrainedTokenizerBase | None) -> Finding | None:
    """Captions over CLIP's 75 content tokens: the text encoder silently drops the rest."""
    notes = {}
    for record in records:
        counted = count_clip_tokens(record.caption, tokenizer)
        if counted.count > CLIP_CAPTION_TOKENS:
            at_least = "" if counted.exact else "at least "
            notes[record.rel] = f"{at_least}{counted.count} tokens; cut: \"{counted.cut_text}\""
    if not notes:
        return None
    how = "counted with the CLIP tokenizer" if tokenizer is not None else "approximate: counted without a CLIP tokenizer"
    return Finding(
        "caption_too_long", "warning",
        f"longer than the {CLIP_CAPTION_TOKENS} tokens CLIP reads ({how}); the end is ignored in training, "
        "so put the important words first or shorten", list(notes), False, notes,
    )


def shared_caption(records: list[ImageRecord], max_share: float) -> Finding | None:
    """One caption used by more than `max_share` of the images (e.g. every caption "character design")."""
    normalized = {record.rel: " ".join(record.caption.lower().split()) for record in records}
    counts = Counter(caption for caption in normalized.values() if caption)
    if not counts:
        return None
    caption, count = counts.most_common(1)[0]
    if count < 2 or count <= max_share * len(records):
        return None
    items = [rel for rel, text in normalized.items() if text == caption]
    return Finding(
        "shared_caption", "warning",
        f"{count} of {len(records)} images ({100 * count / len(records):.0f}%) have the caption \"{caption}\"; "
        "the LoRA cannot learn what sets them apart: describe each image's content and style "
        "(e.g. \"ink wash painting, delicate linework, pastel color palette\")",
        items, False,
    )


def tag_frequency(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """Comma-separated tag counts per image folder, as kohya's `ss_tag_frequency` metadata.

    Tags are stripped and lower-cased; folders are named by their last path part (kohya uses the
    subset folder's name, e.g. "10_mystyle").
    """
    frequency: dict[str, dict[str, int]] = {}
    for record in records:
        folder = frequency.setdefault(record.path.parent.name, {})
        for tag in record.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                folder[tag] = folder.get(tag, 0) + 1
    return frequency
