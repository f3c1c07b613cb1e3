"""The dataset doctor on folders with planted defects, a clean folder, its reports and --fix."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lora_scripts.data.image_index import index_image_dataset
from lora_scripts.datacheck import Report, check_image_dataset, check_text_samples, fix_dataset
from tests.tiny_clip import clip_tokenizer  # the real CLIP BPE, built offline

RESOLUTION = 256
GENERIC = "character design"
# 80 words and 11 commas: 91 CLIP pre-tokenizer pieces; CLIP reads 75, so "side of the scroll, ..." is cut.
LONG_CAPTION = (
    "a quiet ink wash painting of misty mountains at dawn, delicate linework, pastel color palette, "
    "pine trees clinging to grey cliffs above a flowing river, a small wooden boat with a fisherman in a straw hat, "
    "calm water with soft reflections, morning fog drifting between the peaks, distant birds in a pale sky, "
    "rice paper texture, a red seal stamp and vertical calligraphy on the right side of the scroll, "
    "muted greens and warm greys, gentle light from the east"
)


def photo_like(seed: int, width: int = 320, height: int = 320) -> Image.Image:
    """A textured, photo-like picture: smooth multi-scale noise, sensor grain and hard-edged shapes."""
    rng = np.random.default_rng(seed)
    field = np.zeros((height, width, 3), np.float32)
    for cells in (4, 8, 16, 32, 64):
        noise = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        field += np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC), np.float32) / cells**0.5
    field = (field - field.min()) / np.ptp(field) * 255 + rng.normal(0, 6, field.shape)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 10, width // 3), rng.integers(height // 10, height // 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_metadata(root: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["filename,prompt"] + [f'{name},"{caption}"' for name, caption in rows]
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))


def build_defect_set(case: Path) -> Path:
    """case/data with one of each defect; case/escape.png sits outside it."""
    root = case / "data"
    root.mkdir(parents=True)
    originals = [photo_like(seed) for seed in range(8)]
    for i, image in enumerate(originals):
        image.save(root / f"img{i}.png")
    originals[0].save(root / "dup.png", compress_level=1)  # same pixels, different bytes
    originals[1].resize((300, 300), Image.Resampling.LANCZOS).save(root / "resized.png")
    originals[2].filter(ImageFilter.GaussianBlur(3)).save(root / "blurred.png")
    photo_like(20, 64, 64).save(root / "tiny.png")
    photo_like(21, 1200, 200).save(root / "wide.png")
    photo_like(22).save(root / "truncated.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image at all")
    photo_like(23).save(case / "escape.png")
    distinct = ["ink wash painting, misty mountains", "delicate linework, red dress", "pastel color palette, cat"]
    rows = [(f"img{i}.png", caption) for i, caption in enumerate(distinct)] + [("img3.png", LONG_CAPTION)]
    rows += [(name, GENERIC) for name in ("img4.png", "img5.png", "img6.png", "img7.png", "dup.png", "resized.png",
                                          "blurred.png", "tiny.png", "wide.png", "truncated.png", "zero.png", "text.png")]
    rows += [("../escape.png", GENERIC), ("missing.png", "gone")]
    write_metadata(root, rows)
    return root


@pytest.fixture(scope="module")
def defect_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    root = build_defect_set(tmp_path_factory.mktemp("defects"))
    return root, check_image_dataset(index_image_dataset(root, root / "metadata.csv"), RESOLUTION)


def items(report: Report, check: str) -> list[str]:
    finding = report.finding(check)
    assert finding is not None, f"{check} not reported; found {[f.check for f in report.findings]}"
    return finding.items


def test_every_planted_defect_is_flagged(defect_case: tuple[Path, Report]) -> None:
    _, report = defect_case

    assert items(report, "unreadable") == ["truncated.png", "zero.png", "text.png"]
    assert report.finding("unreadable").notes == {"truncated.png": "truncated", "zero.png": "zero bytes", "text.png": "not an image"}
    assert items(report, "exact_duplicate") == ["dup.png"]
    assert report.finding("exact_duplicate").notes["dup.png"] == "same pixels as img0.png"
    assert items(report, "near_duplicate") == ["img1.png", "img2.png", "resized.png", "blurred.png"]
    assert report.finding("near_duplicate").notes["resized.png"].startswith("looks like img1.png")
    assert report.finding("near_duplicate").notes["blurred.png"].startswith("looks like img2.png")
    assert items(report, "blurry") == ["blurred.png"]
    assert items(report, "too_small") == ["tiny.png"]
    assert report.finding("too_small").notes["tiny.png"] == "64x64, upscaled x4.0"
    assert items(report, "extreme_aspect") == ["wide.png"]
    assert items(report, "path_outside_dataset") == ["metadata.csv:18"]
    assert items(report, "missing_file") == ["metadata.csv:19"]
    assert items(report, "caption_too_long") == ["img3.png"]
    shared = report.finding("shared_caption")
    assert shared is not None and f'"{GENERIC}"' in shared.message and "12 of 16 images (75%)" in shared.message
    assert set(shared.items) == {"img4.png", "img5.png", "img6.png", "img7.png", "dup.png", "resized.png", "blurred.png",
                                 "tiny.png", "wide.png", "truncated.png", "zero.png", "text.png"}
    assert report.finding("style_outlier").severity == "info" and "skipped" in report.finding("style_outlier").message
    assert {f.check for f in report.findings if f.blocking} == {"unreadable", "path_outside_dataset", "missing_file"}
    assert report.has_blocking


def test_long_caption_note_shows_the_part_clip_cuts(defect_case: tuple[Path, Report]) -> None:
    _, report = defect_case
    finding = report.finding("caption_too_long")
    note = finding.notes["img3.png"]

    assert "approximate" in finding.message
    count, cut = re.fullmatch(r'at least (\d+) tokens; cut: "(.*)"', note).groups()
    assert int(count) == 91
    assert cut == "side of the scroll, muted greens and warm greys, gentle light from the east"


def test_exact_token_count_with_a_real_clip_tokenizer(tmp_path: Path) -> None:
    tokenizer = clip_tokenizer()
    # 40 made-up words: 40 pre-tokenizer pieces (under 75) but several BPE tokens each.
    caption = " ".join(f"zqxv{chr(97 + i % 26)}kwj" for i in range(40))
    photo_like(0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(caption, encoding="utf-8")
    index = index_image_dataset(tmp_path, None)

    assert check_image_dataset(index, RESOLUTION).finding("caption_too_long") is None
    finding = check_image_dataset(index, RESOLUTION, clip_tokenizer=tokenizer).finding("caption_too_long")

    count, cut = re.fullmatch(r'(\d+) tokens; cut: "(.*)"', finding.notes["a.png"]).groups()
    kept = tokenizer(caption, truncation=True, max_length=77)["input_ids"]
    assert len(kept) == 77 and int(count) > 75
    assert tokenizer.decode(kept, skip_special_tokens=True).replace(" ", "") + cut.replace(" ", "") == caption.replace(" ", "")


def test_clean_set_passes(tmp_path: Path) -> None:
    captions = ["ink wash painting, mountains", "delicate linework, crane", "pastel color palette, garden",
                "ink wash painting, river boat", "delicate linework, bamboo", "pastel color palette, teahouse",
                "ink wash painting, pine", "delicate linework, bridge"]
    for i, caption in enumerate(captions):
        photo_like(100 + i, 320, 288 + 8 * i).save(tmp_path / f"c{i}.jpg", quality=92)
        (tmp_path / f"c{i}.txt").write_text(caption, encoding="utf-8")

    report = check_image_dataset(index_image_dataset(tmp_path, None), RESOLUTION)

    assert [f.check for f in report.findings] == ["style_outlier"]  # only the "skipped: no embeddings" note
    assert not report.has_blocking
    assert report.stats["tag_frequency"][tmp_path.name]["ink wash painting"] == 3


def test_blur_floor_catches_blurred_and_upscaled_images_in_a_small_set(tmp_path: Path) -> None:
    # Three images: too few for the relative-to-median test, so only the absolute floor applies.
    sharp = photo_like(7, 640, 640)
    sharp.save(tmp_path / "sharp.png")
    sharp.filter(ImageFilter.GaussianBlur(2.5)).save(tmp_path / "soft_scan.png")
    sharp.resize((160, 160)).resize((640, 640), Image.Resampling.BICUBIC).save(tmp_path / "upscaled_screenshot.png")
    for name in ("sharp", "soft_scan", "upscaled_screenshot"):
        (tmp_path / f"{name}.txt").write_text(name, encoding="utf-8")

    report = check_image_dataset(index_image_dataset(tmp_path, None), 512)

    assert items(report, "blurry") == ["soft_scan.png", "upscaled_screenshot.png"]
    assert all("< 15.0 " in note for note in report.finding("blurry").notes.values())  # the floor, not the median


def test_style_outlier_from_clip_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    style = rng.normal(size=64)
    embeddings = {}
    for i in range(9):
        photo_like(i).save(tmp_path / f"s{i}.png")
        (tmp_path / f"s{i}.txt").write_text(f"style, picture {i}", encoding="utf-8")
        embeddings[f"s{i}.png"] = style + 0.3 * rng.normal(size=64)
    embeddings["s4.png"] = rng.normal(size=64)  # a sketch among finished paintings
    embeddings["elsewhere.png"] = rng.normal(size=64)  # not in the dataset: ignored

    report = check_image_dataset(index_image_dataset(tmp_path, None), RESOLUTION, embeddings=embeddings)

    assert items(report, "style_outlier") == ["s4.png"]
    assert report.finding("style_outlier").severity == "warning"


def test_json_and_terminal_forms(defect_case: tuple[Path, Report]) -> None:
    root, report = defect_case

    data = json.loads(json.dumps(report.to_json()))

    assert data["blocking"] is True
    assert [f["check"] for f in data["findings"]][:3] == ["missing_file", "path_outside_dataset", "unreadable"]
    unreadable = next(f for f in data["findings"] if f["check"] == "unreadable")
    assert unreadable["severity"] == "error" and unreadable["items"] == ["truncated.png", "zero.png", "text.png"]
    assert data["stats"]["images"] == 16 and data["stats"]["readable_images"] == 13
    assert data["stats"]["tag_frequency"][root.name][GENERIC] == 12
    text = report.format_terminal()
    assert "ERROR (blocking)   unreadable (3):" in text and "zero.png" in text and "zero bytes" in text
    assert f"Most frequent tags: {GENERIC} x12" in text and "3 blocking finding(s)." in text


def test_html_report_embeds_thumbnails_of_flagged_images(defect_case: tuple[Path, Report], tmp_path: Path) -> None:
    _, report = defect_case
    page_path = tmp_path / "report.html"

    report.write_html(page_path)

    page = page_path.read_text(encoding="utf-8")
    thumbnails = {alt: data for data, alt in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" alt="([^"]+)">', page)}
    assert {"blurred.png", "dup.png", "tiny.png", "wide.png", "resized.png"} <= set(thumbnails)
    wide = Image.open(io.BytesIO(base64.b64decode(thumbnails["wide.png"])))
    assert wide.size == (128, 21)
    assert "zero.png" not in thumbnails and "no preview" in page  # unreadable files get a placeholder
    assert "http" not in page  # self-contained
    assert "blurry" in page and "sharpness" in page


def test_fix_moves_files_and_rewrites_metadata_with_backup(tmp_path: Path) -> None:
    root = build_defect_set(tmp_path)
    photo_like(30, 900, 600).save(root / "big.jpg", quality=95)
    original_csv = (root / "metadata.csv").read_bytes()
    (root / "metadata.csv").write_bytes(original_csv + b'big.jpg,"large, landscape"\n')
    original_csv = (root / "metadata.csv").read_bytes()
    index = index_image_dataset(root, root / "metadata.csv")
    report = check_image_dataset(index, RESOLUTION)

    summary = fix_dataset(index, report, max_side=450)

    moved = ["truncated.png", "zero.png", "text.png", "dup.png"]
    assert list(summary.moved) == moved
    for name in moved:
        assert not (root / name).exists() and summary.moved[name] == root / "rejected" / name
    assert (root / "rejected" / "zero.png").stat().st_size == 0
    assert (root / "rejected" / "dup.png").read_bytes() != b"" and (root / "img0.png").exists()
    assert summary.metadata_backup == root / "metadata.csv.bak"
    assert (root / "metadata.csv.bak").read_bytes() == original_csv
    rewritten = (root / "metadata.csv").read_bytes()
    assert rewritten.startswith(b"\xef\xbb\xbf")
    assert [line.split(",")[0] for line in rewritten.decode("utf-8-sig").splitlines()] == [
        line.split(",")[0] for line in original_csv.decode("utf-8-sig").splitlines() if line.split(",")[0] not in moved]
    assert Image.open(root / "big.jpg").size == (450, 300)
    assert Image.open(root / "rejected" / "originals" / "big.jpg").size == (900, 600)
    assert Image.open(root / "wide.png").size == (450, 75)
    assert set(summary.resized) == {"big.jpg", "wide.png"}
    assert f"moved dup.png -> {root / 'rejected' / 'dup.png'}" in summary.format_terminal()

    after = check_image_dataset(index_image_dataset(root, root / "metadata.csv"), RESOLUTION)
    assert after.finding("unreadable") is None and after.finding("exact_duplicate") is None
    assert after.finding("unlisted_image") is None  # rejected/ is not part of the dataset


def test_fix_in_a_repeat_folder_moves_the_caption_file_too(tmp_path: Path) -> None:
    folder = tmp_path / "5_style"
    folder.mkdir()
    photo_like(0).save(folder / "a.png")
    photo_like(0).save(folder / "a_copy.png")
    for name in ("a", "a_copy"):
        (folder / f"{name}.txt").write_text(f"style, {name}", encoding="utf-8")
    index = index_image_dataset(tmp_path, None)

    summary = fix_dataset(index, check_image_dataset(index, RESOLUTION))

    assert summary.moved == {"5_style/a_copy.png": tmp_path / "rejected" / "5_style" / "a_copy.png"}
    assert (tmp_path / "rejected" / "5_style" / "a_copy.txt").read_text(encoding="utf-8") == "style, a_copy"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt"]
    assert summary.metadata_backup is None


def test_text_samples_checks() -> None:
    samples = [
        ("问：血压多少算高？", "答：收缩压>140 mmHg定义为高血压一级。", "train.jsonl:1"),
        ("问：孕妇能用ACEI吗？", "答：ACEI类药物禁用于妊娠期女性。", "train.jsonl:2"),
        ("问：血压多少算高？", "答：收缩压>140 mmHg定义为高血压一级。", "train.jsonl:3"),
        ("问：头痛怎么办？", "   ", "train.jsonl:4"),
    ]
    rows = [("train.jsonl:1", {"question": "血压多少算高？", "answer": "..."}),
            ("train.jsonl:5", {"question": "发烧"}), ("train.jsonl:6", {"question": "", "answer": "多喝水"})]
    validation = [("问：孕妇能用ACEI吗？", "答：不能。", "val.jsonl:1"), ("问：失眠怎么办？", "答：规律作息。", "val.jsonl:2")]

    report = check_text_samples(samples, token_lengths=[40, 300, 40, 10], max_seq_length=256,
                                template_fields=["question", "answer"], raw_rows=rows, validation_samples=validation)

    assert items(report, "duplicate_sample") == ["train.jsonl:3"]
    assert report.finding("duplicate_sample").notes["train.jsonl:3"] == "same prompt and response as train.jsonl:1"
    assert items(report, "empty_response") == ["train.jsonl:4"]
    assert report.finding("truncated_sample").notes == {"train.jsonl:2": "300 tokens, the last 44 are cut"}
    assert report.finding("missing_template_field").notes == {"train.jsonl:5": "missing answer", "train.jsonl:6": "empty question"}
    assert items(report, "train_val_overlap") == ["val.jsonl:1"]
    assert report.has_blocking and [f.check for f in report.findings if f.blocking] == ["missing_template_field"]
    assert report.stats == {"samples": 4, "validation_samples": 2, "max_tokens": 300, "mean_tokens": 97.5}
    with pytest.raises(ValueError, match="one length per sample"):
        check_text_samples(samples, token_lengths=[1], max_seq_length=8)


def test_clean_text_samples_pass() -> None:
    samples = [(f"问：问题{i}？", f"答：回答{i}。", f"train.jsonl:{i}") for i in range(5)]
    report = check_text_samples(samples, token_lengths=[20] * 5, max_seq_length=64, validation_samples=[("问：别的？", "答：好。", "val:1")])
    assert report.findings == [] and not report.has_blocking
