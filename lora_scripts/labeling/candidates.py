"""Candidate label sets for zero-shot labelling, and picking labels from CLIP probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lora_scripts.errors import UserError

# Used when no labels are given, so `tools/auto_label.py --input … --output …` works as the guide shows.
DEFAULT_CATEGORIES: dict[str, list[str]] = {
    "subject": [
        "a portrait of a person",
        "a group of people",
        "an animal",
        "buildings",
        "a city street",
        "a landscape",
        "an interior room",
        "a vehicle",
        "food",
        "a still life of objects",
    ],
    "style": [
        "a photograph",
        "a digital painting",
        "an oil painting",
        "a watercolor painting",
        "an anime illustration",
        "a 3d render",
        "a pencil sketch",
        "pixel art",
        "a painting in cyberpunk style",
    ],
}


@dataclass(frozen=True)
class Selection:
    """How labels are picked per category from CLIP's softmax probabilities."""

    top_k: int = 1
    threshold: float = 0.0
    strict: bool = False

    def pick(self, probabilities: torch.Tensor, labels: list[str]) -> list[str]:
        """The `top_k` most probable labels whose probability is >= `threshold`, most probable first.

        When none reaches the threshold the single best label is still kept, unless `strict`.
        """
        order = torch.argsort(probabilities, descending=True, stable=True)[: self.top_k].tolist()
        kept = [labels[index] for index in order if probabilities[index].item() >= self.threshold]
        if not kept and not self.strict:
            kept = [labels[order[0]]]
        return kept


def _clean_labels(raw: list[object], source: str) -> list[str]:
    """Strip labels, reject empty sets, non-strings and duplicates (they would split probability)."""
    labels: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            raise UserError(f"{source}: every label must be a non-empty string, got {item!r}")
        label = item.strip()
        if label in labels:
            raise UserError(f"{source}: label {label!r} is listed twice; remove the duplicate")
        labels.append(label)
    if not labels:
        raise UserError(f"{source}: no labels given; list at least one")
    return labels


def _read_labels_file(path: Path) -> list[str]:
    """One label per line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read --labels-file {path}: {exc.strerror or exc}") from exc
    return _clean_labels([line for line in lines if line.strip() and not line.lstrip().startswith("#")], str(path))


def _read_categories_file(path: Path) -> dict[str, list[str]]:
    """A YAML or JSON mapping `category: [label, …]`, kept in file order."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read --categories {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"--categories {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or not data:
        example = "`style: [oil painting, sketch]`"
        raise UserError(f"--categories {path} must map category names to label lists, e.g. {example}")
    categories: dict[str, list[str]] = {}
    for name, labels in data.items():
        if not isinstance(labels, list):
            raise UserError(f"--categories {path}: category {name!r} must be a list of labels")
        categories[str(name)] = _clean_labels(labels, f"{path} category {name!r}")
    return categories


def load_label_sets(
    labels: list[str] | None, labels_file: Path | None, categories_file: Path | None
) -> dict[str, list[str]]:
    """Candidate labels grouped by category, in caption order.

    Plain `--labels`/`--labels-file` lists become a single category named "labels"; with no
    source at all, `DEFAULT_CATEGORIES` is used. Raises UserError for unreadable or malformed input.
    """
    if categories_file is not None:
        return _read_categories_file(categories_file)
    if labels_file is not None:
        return {"labels": _read_labels_file(labels_file)}
    if labels is not None:
        return {"labels": _clean_labels(list(labels), "--labels")}
    return DEFAULT_CATEGORIES
