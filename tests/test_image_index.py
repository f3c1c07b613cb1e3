"""Indexing image datasets: metadata.csv variants, caption files, kohya repeat folders, unsafe paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_scripts.data import image_index as ix
from lora_scripts.data.image_index import index_image_dataset, verify_image
from lora_scripts.errors import UserError


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def kinds(index: ix.ImageIndex) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in index.problems:
        found.setdefault(problem.kind, []).append(problem.where)
    return found


def test_metadata_csv_rows_become_records_with_their_line(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "poses" / "b.jpg", seed=1)
    write_csv(tmp_path / "metadata.csv",
              'filename,prompt\na.png,"ink wash painting, delicate linework"\nposes/b.jpg,"pastel color palette,\nfront pose"\n')

    index = index_image_dataset(tmp_path, tmp_path / "metadata.csv")

    assert [(r.rel, r.caption, r.source, r.repeats) for r in index.records] == [
        ("a.png", "ink wash painting, delicate linework", "metadata.csv:2", 1),
        ("poses/b.jpg", "pastel color palette,\nfront pose", "metadata.csv:3", 1),
    ]
    assert index.records[1].path == tmp_path / "poses" / "b.jpg" and index.records[1].path.is_absolute()
    assert index.problems == []


@pytest.mark.parametrize(("header", "encoding"), [
    ("filename,prompt", "utf-8-sig"), ("file_name,text", "utf-8"), ("Image,Caption", "utf-8-sig"),
    ("id,filename,prompt,score", "utf-8"),
])
def test_accepted_headers_with_and_without_bom(tmp_path: Path, header: str, encoding: str) -> None:
    save_image(tmp_path / "a.png")
    columns = [column.lower() for column in header.split(",")]
    values = {"id": "7", "score": "0.5", "filename": "a.png", "file_name": "a.png", "image": "a.png",
              "prompt": "水墨画, 线条", "text": "水墨画, 线条", "caption": "水墨画, 线条"}
    write_csv(tmp_path / "metadata.csv", f"{header}\n" + ",".join(f'"{values[c]}"' for c in columns) + "\n", encoding)

    index = index_image_dataset(tmp_path, None)  # metadata.csv is found in the folder

    assert index.metadata_path == tmp_path / "metadata.csv"
    assert [(r.rel, r.caption) for r in index.records] == [("a.png", "水墨画, 线条")]


def test_wrong_header_names_file_columns_and_expected_header(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    csv_path = write_csv(tmp_path / "labels.csv", "path,description\na.png,a cat\n")

    with pytest.raises(UserError) as error:
        index_image_dataset(tmp_path, csv_path)

    message = str(error.value)
    assert str(csv_path) in message and "['path', 'description']" in message and "filename,prompt" in message


def test_non_utf8_csv_is_refused_with_how_to_fix(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    csv_path = write_csv(tmp_path / "metadata.csv", "filename,prompt\na.png,水墨画风格\n", encoding="gbk")

    with pytest.raises(UserError, match="not UTF-8.*re-save it as UTF-8") as error:
        index_image_dataset(tmp_path, csv_path)
    assert str(csv_path) in str(error.value)


def test_paths_leaving_the_folder_are_blocking_and_named_by_row(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save_image(root / "a.png")
    outside = save_image(tmp_path / "escape.png")
    os.symlink(outside, root / "link.png")
    write_csv(root / "metadata.csv",
              f"filename,prompt\na.png,ok\n../escape.png,x\n{outside},y\nlink.png,z\nsub/../a.png,again\n")

    index = index_image_dataset(root, root / "metadata.csv")

    assert [r.rel for r in index.records] == ["a.png"]
    assert kinds(index) == {ix.PATH_OUTSIDE_DATASET: ["metadata.csv:3", "metadata.csv:4", "metadata.csv:5"],
                            ix.DUPLICATE_ROW: ["metadata.csv:6"]}
    assert all(p.blocking for p in index.problems if p.kind == ix.PATH_OUTSIDE_DATASET)
    assert "../escape.png" in index.problems[0].message
    blocking = [p for p in index.problems if p.blocking]
    assert len(blocking) == 3 and blocking[0].where == "metadata.csv:3" and blocking[0].message.startswith("../escape.png leads outside")


def test_missing_files_empty_prompts_and_unlisted_images(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", seed=1)
    save_image(tmp_path / "extra" / "c.webp", seed=2)
    save_image(tmp_path / "rejected" / "old.png", seed=3)  # where --fix moves files: not reported
    save_image(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", seed=4)  # hidden: not reported
    write_csv(tmp_path / "metadata.csv", "filename,prompt\na.png,one\nb.png,\ngone.png,two\n,three\n")

    index = index_image_dataset(tmp_path, tmp_path / "metadata.csv")

    assert [r.rel for r in index.records] == ["a.png", "b.png"]
    assert kinds(index) == {ix.MISSING_CAPTION: ["b.png"], ix.MISSING_FILE: ["metadata.csv:4"],
                            ix.BAD_ROW: ["metadata.csv:5"], ix.UNLISTED_IMAGE: ["extra/c.webp"]}
    assert {p.kind for p in index.problems if p.blocking} == {ix.MISSING_FILE, ix.BAD_ROW}


def test_caption_files_and_kohya_repeat_folders(tmp_path: Path) -> None:
    save_image(tmp_path / "top.png")
    (tmp_path / "top.txt").write_text("watercolor, city\nsecond line ignored\n", encoding="utf-8")
    save_image(tmp_path / "bare.jpg", seed=1)
    save_image(tmp_path / "10_mystyle" / "a.png", seed=2)
    (tmp_path / "10_mystyle" / "a.txt").write_text("mystyle, red dress", encoding="utf-8")
    save_image(tmp_path / "10_mystyle" / "b.PNG", seed=3)
    save_image(tmp_path / "3_ink_wash" / "c.webp", seed=4)
    (tmp_path / "3_ink_wash" / "c.txt").write_text("", encoding="utf-8")
    save_image(tmp_path / "poses" / "d.png", seed=5)
    save_image(tmp_path / "0_off" / "e.png", seed=6)
    save_image(tmp_path / "rejected" / "f.png", seed=7)
    (tmp_path / "._top.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble companion, not an image
    save_image(tmp_path / "10_mystyle" / ".ipynb_checkpoints" / "a-checkpoint.png", seed=8)

    index = index_image_dataset(tmp_path, None)

    assert [(r.rel, r.caption, r.repeats, r.source) for r in index.records] == [
        ("10_mystyle/a.png", "mystyle, red dress", 10, "10_mystyle/a.txt"),
        ("10_mystyle/b.PNG", "mystyle", 10, "folder name 10_mystyle"),  # kohya: folder name as caption
        ("3_ink_wash/c.webp", "", 3, "3_ink_wash/c.txt"),
        ("bare.jpg", "", 1, ""),
        ("top.png", "watercolor, city", 1, "top.txt"),
    ]
    assert kinds(index) == {ix.IGNORED_FOLDER: ["0_off/", "poses/"],
                            ix.MISSING_CAPTION: ["3_ink_wash/c.webp", "bare.jpg"]}
    assert not [p for p in index.problems if p.blocking]


def test_symlinked_image_leading_outside_is_blocking(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save_image(root / "a.png")
    os.symlink(save_image(tmp_path / "secret.png"), root / "b.png")

    index = index_image_dataset(root, None)

    assert [r.rel for r in index.records] == ["a.png"]
    assert [(p.kind, p.where, p.blocking) for p in index.problems if p.kind != ix.MISSING_CAPTION] == [
        (ix.PATH_OUTSIDE_DATASET, "b.png", True)]


def test_missing_or_empty_dataset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        index_image_dataset(tmp_path / "nope", None)
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(UserError, match="no images in"):
        index_image_dataset(tmp_path, None)
    with pytest.raises(UserError, match="metadata_path .* does not exist"):
        index_image_dataset(tmp_path, tmp_path / "metadata.csv")
    write_csv(tmp_path / "metadata.csv", "filename,prompt\n")
    with pytest.raises(UserError, match="header but no rows"):
        index_image_dataset(tmp_path, tmp_path / "metadata.csv")
    (tmp_path / "metadata.csv").unlink()
    save_image(tmp_path / "poses" / "a.png")  # only a folder without repeat count: found, but nothing to train
    index = index_image_dataset(tmp_path, None)
    assert index.records == []


def test_verify_image_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good_png = save_image(tmp_path / "good.png", size=(64, 64))
    good_jpg = tmp_path / "good.jpg"
    Image.open(good_png).save(good_jpg, quality=90)
    truncated_png = tmp_path / "cut.png"
    truncated_png.write_bytes(good_png.read_bytes()[: good_png.stat().st_size * 2 // 3])
    truncated_jpg = tmp_path / "cut.jpg"
    truncated_jpg.write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is a text file")

    assert [verify_image(p) for p in (good_png, good_jpg, truncated_png, truncated_jpg)] == [None, None, "truncated", "truncated"]
    assert verify_image(tmp_path / "zero.png") == "zero bytes"
    assert verify_image(tmp_path / "text.png") == "not an image"

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above this, raises above twice
    assert verify_image(save_image(tmp_path / "warn.png", size=(40, 40))) == "decompression bomb (1600 pixels)"
    assert verify_image(save_image(tmp_path / "bomb.png", size=(100, 100))) == "decompression bomb (10000 pixels)"
