"""CLIP zero-shot auto-labelling, checked from the outside against a tiny random CLIP.

Expected labels are computed independently with `CLIPModel(...)(...).logits_per_image`, the way
the guide's snippet does, and compared with what the tool wrote.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from lora_scripts.errors import UserError
from lora_scripts.label import run_label
from lora_scripts.labeling.args import build_label_parser
from lora_scripts.labeling.candidates import DEFAULT_CATEGORIES
from tests.tiny_clip import build_tiny_clip

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "auto_label.py"
LABELS = ["a photo of buildings", "a painting in cyberpunk style", "a watercolor landscape", "a pencil sketch of a cat"]
COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (250, 250, 250), (10, 10, 10), (200, 180, 0), (0, 200, 200)]
# Seed 1 gives a tiny random CLIP whose argmax differs between these solid colours.
CLIP_SEED = 1


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=CLIP_SEED)


@pytest.fixture(scope="module")
def reference_clip(clip_dir: Path) -> tuple[CLIPModel, CLIPProcessor]:
    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Seven solid-colour images, two inside a kohya `10_style` subfolder, plus a non-image file."""
    root = tmp_path / "style_train"
    (root / "10_style").mkdir(parents=True)
    for index, colour in enumerate(COLOURS):
        folder = root / "10_style" if index >= 5 else root
        Image.new("RGB", (48, 40), colour).save(folder / f"img{index}.png")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    return root


def image_names(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*.png"))


def clip_probabilities(reference: tuple[CLIPModel, CLIPProcessor], root: Path, labels: list[str]) -> torch.Tensor:
    """[images in sorted order, labels] zero-shot probabilities from CLIPModel's own forward pass."""
    model, processor = reference
    images = [Image.open(root / name).convert("RGB") for name in image_names(root)]
    inputs = processor(text=labels, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image.softmax(dim=-1)


def label(root: Path, clip_dir: Path, *options: str) -> int:
    args = build_label_parser(argparse.ArgumentParser()).parse_args(
        ["--input", str(root), "--model", str(clip_dir), *options]
    )
    return run_label(args)


def read_metadata(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["filename", "prompt"]
        return {row["filename"]: row["prompt"] for row in reader}


def test_cli_writes_clip_argmax_for_every_image(dataset: Path, clip_dir: Path, reference_clip) -> None:
    output = dataset / "metadata.csv"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(dataset), "--output", str(output), "--model", str(clip_dir),
         "--batch-size", "3", "--labels", *LABELS],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr

    probabilities = clip_probabilities(reference_clip, dataset, LABELS)
    expected = {name: LABELS[index] for name, index in zip(image_names(dataset), probabilities.argmax(dim=-1).tolist())}
    assert len(set(expected.values())) > 1, "test data should make CLIP pick different labels"
    assert read_metadata(output) == expected
    assert list(read_metadata(output)) == sorted(expected)  # deterministic order, subfolder paths relative to --input
    assert "10_style/img5.png" in expected


def test_categories_give_trigger_then_one_label_per_category(dataset: Path, clip_dir: Path, reference_clip) -> None:
    categories = {"style": LABELS[:2], "subject": ["a dog", "a city", "a forest"]}
    categories_file = dataset.parent / "categories.yaml"
    categories_file.write_text(yaml.safe_dump(categories), encoding="utf-8")

    assert label(dataset, clip_dir, "--sidecars", "--categories", str(categories_file), "--trigger", "sks") == 0

    best = {
        category: [labels[i] for i in clip_probabilities(reference_clip, dataset, labels).argmax(dim=-1).tolist()]
        for category, labels in categories.items()
    }
    for row, name in enumerate(image_names(dataset)):
        caption = (dataset / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert caption == f"sks, {best['style'][row]}, {best['subject'][row]}"


def test_default_label_sets_are_used_without_labels(dataset: Path, clip_dir: Path) -> None:
    assert label(dataset, clip_dir, "--output", str(dataset / "metadata.csv")) == 0

    for caption in read_metadata(dataset / "metadata.csv").values():
        subject, style = caption.split(", ")
        assert subject in DEFAULT_CATEGORIES["subject"] and style in DEFAULT_CATEGORIES["style"]


def test_human_captions_are_kept_unless_overwrite(dataset: Path, clip_dir: Path, capsys) -> None:
    output = dataset / "metadata.csv"
    output.write_text("filename,prompt\nimg0.png,my own words\nimg1.png,\n", encoding="utf-8")
    (dataset / "img2.txt").write_text("hand-written sidecar", encoding="utf-8")

    label(dataset, clip_dir, "--output", str(output), "--sidecars", "--labels", *LABELS)

    rows = read_metadata(output)
    assert rows["img0.png"] == "my own words"
    assert rows["img1.png"] in LABELS  # a blank prompt counts as missing
    assert len(rows) == len(COLOURS)
    assert (dataset / "img2.txt").read_text(encoding="utf-8") == "hand-written sidecar"
    assert (dataset / "img0.txt").read_text(encoding="utf-8") in LABELS
    printed = capsys.readouterr().out
    assert f"{output}: {len(COLOURS) - 1} captions written, 1 kept" in printed
    assert f".txt sidecars: {len(COLOURS) - 1} written, 1 kept" in printed

    label(dataset, clip_dir, "--output", str(output), "--sidecars", "--overwrite", "--labels", *LABELS)

    assert read_metadata(output)["img0.png"] in LABELS
    assert (dataset / "img2.txt").read_text(encoding="utf-8") in LABELS
    assert not list(dataset.glob(".*.tmp"))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_and_threshold_follow_clip_probabilities(dataset: Path, clip_dir: Path, reference_clip, top_k) -> None:
    labels_file = dataset.parent / "labels.txt"
    labels_file.write_text("# candidate labels\n" + "\n".join(LABELS) + "\n\n", encoding="utf-8")
    probabilities = clip_probabilities(reference_clip, dataset, LABELS)
    # A threshold halfway between two observed probabilities: some images keep a second label, some don't.
    observed = probabilities.flatten().sort().values
    threshold = float((observed[len(observed) // 2] + observed[len(observed) // 2 + 1]) / 2)
    output = dataset / "metadata.csv"

    label(dataset, clip_dir, "--output", str(output), "--labels-file", str(labels_file),
          "--top-k", str(top_k), "--threshold", str(threshold))

    rows = read_metadata(output)
    for row, name in enumerate(image_names(dataset)):
        ranked = probabilities[row].argsort(descending=True)[:top_k].tolist()
        kept = [LABELS[i] for i in ranked if probabilities[row, i] >= threshold] or [LABELS[ranked[0]]]
        assert rows[name] == ", ".join(kept)
    if top_k > 1:
        assert {len(caption.split(", ")) for caption in rows.values()} == {1, 2}


def test_strict_threshold_can_leave_images_uncaptioned(dataset: Path, clip_dir: Path, capsys) -> None:
    output = dataset / "metadata.csv"
    label(dataset, clip_dir, "--output", str(output), "--labels", *LABELS, "--threshold", "0.99", "--threshold-strict")

    assert read_metadata(output) == {}
    assert f"{len(COLOURS)} image(s) had no label above --threshold" in capsys.readouterr().out

    label(dataset, clip_dir, "--output", str(output), "--labels", *LABELS, "--threshold", "0.99",
          "--threshold-strict", "--trigger", "sks")
    assert set(read_metadata(output).values()) == {"sks"}


def test_embeddings_are_unit_clip_image_features_keyed_by_path(dataset: Path, clip_dir: Path, reference_clip) -> None:
    embeddings_file = dataset.parent / "embeddings.npz"
    assert label(dataset, clip_dir, "--embeddings-out", str(embeddings_file), "--batch-size", "4") == 0

    model, processor = reference_clip
    names = image_names(dataset)
    with np.load(embeddings_file) as archive:
        assert sorted(archive.files) == names
        stored = np.stack([archive[name] for name in names])
    assert stored.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    inputs = processor(images=[Image.open(dataset / name).convert("RGB") for name in names], return_tensors="pt")
    with torch.no_grad():
        features = model.visual_projection(model.vision_model(**inputs).pooler_output)
    np.testing.assert_allclose(stored, torch.nn.functional.normalize(features, dim=-1).numpy(), atol=1e-5)
    assert not (dataset / "metadata.csv").exists()


def test_truncated_and_fake_images_are_skipped_and_reported(dataset: Path, clip_dir: Path, capsys) -> None:
    valid = (dataset / "img0.png").read_bytes()
    (dataset / "10_style" / "broken.png").write_bytes(valid[: len(valid) // 2])
    (dataset / "fake.jpg").write_text("plain text", encoding="utf-8")
    output = dataset / "metadata.csv"

    assert label(dataset, clip_dir, "--output", str(output), "--labels", *LABELS) == 0

    assert set(read_metadata(output)) == {name for name in image_names(dataset) if name != "10_style/broken.png"}
    errors = capsys.readouterr().err
    assert "skipped unreadable image 10_style/broken.png:" in errors
    assert "skipped unreadable image fake.jpg:" in errors

    # A rerun only retries the broken files: still reported, but not an error.
    assert label(dataset, clip_dir, "--output", str(output), "--labels", *LABELS) == 0
    assert "skipped unreadable image fake.jpg:" in capsys.readouterr().err


def test_missing_model_is_one_line_error_without_traceback(dataset: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(dataset), "--output", str(dataset / "metadata.csv"),
         "--model", "openai/clip-vit-base-patch32", "--labels", *LABELS],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: CLIP model folder not found: openai/clip-vit-base-patch32. Download it once "
        "(e.g. `hf download openai/clip-vit-base-patch32 --local-dir models/clip`) and pass --model models/clip"
    ]
    assert not (dataset / "metadata.csv").exists()


def test_folder_without_readable_images_is_a_user_error(tmp_path: Path, clip_dir: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(UserError, match="no images"):
        label(tmp_path, clip_dir, "--output", str(tmp_path / "metadata.csv"), "--labels", *LABELS)

    (tmp_path / "fake.png").write_text("not a png", encoding="utf-8")
    with pytest.raises(UserError, match="none of the 1 images"):
        label(tmp_path, clip_dir, "--output", str(tmp_path / "metadata.csv"), "--labels", *LABELS)
