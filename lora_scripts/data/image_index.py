"""Find the images of an image dataset and their captions; shared by training and `check-data`.

Caption sources, first match wins:

1. `metadata.csv` (the `metadata_path` given, else `train_data_dir/metadata.csv`) with a header
   row `filename,prompt` (the guide's), `file_name,text` (diffusers' imagefolder) or
   `image,caption`; UTF-8 with or without BOM. Filenames are relative to `train_data_dir` and may
   name sub-folders. Images in the folder that the CSV does not list are reported, not trained.
2. Otherwise, caption files beside the images (`a.png` + `a.txt`; the first line is the caption,
   as kohya reads it). Images directly in `train_data_dir` repeat once. Sub-folders named like
   kohya's `10_mystyle` repeat their images 10 times per epoch and, as in kohya
   (`DreamBoothDataset`), an image there without a caption file is captioned with the folder's
   name after the count ("mystyle"). Other sub-folders are reported and skipped (kohya skips
   them too); `rejected/` (where `check-data --fix` moves files) is skipped silently.

Every filename must stay inside `train_data_dir`: `../x.png`, absolute paths and symlinks that
lead outside are blocking problems.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lora_scripts.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILENAME = "metadata.csv"
REJECTED_FOLDER = "rejected"
# (filename column, caption column) pairs accepted as a metadata.csv header, compared lower-cased.
CAPTION_COLUMNS = (("filename", "prompt"), ("file_name", "text"), ("image", "caption"))
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")

# DataProblem kinds.
PATH_OUTSIDE_DATASET = "path_outside_dataset"
MISSING_FILE = "missing_file"
BAD_ROW = "bad_row"
DUPLICATE_ROW = "duplicate_row"
UNREADABLE_CAPTION = "unreadable_caption"
MISSING_CAPTION = "missing_caption"
UNLISTED_IMAGE = "unlisted_image"
IGNORED_FOLDER = "ignored_folder"


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its caption and how often it repeats per epoch."""

    path: Path  # absolute
    rel: str  # as the user wrote it (metadata.csv) or relative to train_data_dir (posix)
    caption: str
    repeats: int = 1
    source: str = ""  # where the caption came from, e.g. "metadata.csv:12" or "10_x/a.txt"


@dataclass(frozen=True)
class DataProblem:
    """Something wrong with the dataset layout; `blocking` problems stop training."""

    kind: str
    where: str  # "metadata.csv:12" for a row, else the image path relative to train_data_dir
    message: str
    blocking: bool


@dataclass
class ImageIndex:
    """The images found under `root` and the problems met while finding them."""

    root: Path
    metadata_path: Path | None
    caption_extension: str = ".txt"
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)


def index_image_dataset(
    train_data_dir: Path, metadata_path: Path | None = None, caption_extension: str = ".txt"
) -> ImageIndex:
    """Index the images of `train_data_dir` with their captions (see the module docstring).

    Raises UserError when the folder is missing or holds no images, when `metadata_path` is
    missing, not UTF-8, or lacks a recognised header.
    """
    root = Path(os.path.abspath(train_data_dir))
    if not root.is_dir():
        raise UserError(f"train_data_dir {train_data_dir} is not a folder; check the path in your config")
    if metadata_path is None and (root / METADATA_FILENAME).is_file():
        metadata_path = root / METADATA_FILENAME
    if metadata_path is not None:
        metadata_path = Path(os.path.abspath(metadata_path))
        index = ImageIndex(root, metadata_path, caption_extension)
        _index_metadata_rows(index)
    else:
        index = ImageIndex(root, None, caption_extension)
        _index_caption_files(index)
    if not index.records and not index.problems:
        raise UserError(f"no images in {root} (looked for {' '.join(IMAGE_EXTENSIONS)} files)")
    return index


def verify_image(path: Path) -> str | None:
    """Decode `path` fully with Pillow; return None if it is a usable image, else a short reason.

    Reasons: "zero bytes", "not an image", "truncated", "decompression bomb (N pixels)" (larger
    than Pillow's Image.MAX_IMAGE_PIXELS), or "corrupt (...)".
    """
    if path.stat().st_size == 0:
        return "zero bytes"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()  # checks structure and CRCs; the image is unusable afterwards
            with Image.open(path) as image:
                image.load()  # verify() does not decode pixels, so truncated data needs a load
    except UnidentifiedImageError:
        return "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return f"decompression bomb ({pixels.group(1) if pixels else 'over MAX_IMAGE_PIXELS'} pixels)"
    except (OSError, SyntaxError, ValueError) as exc:
        return "truncated" if "truncated" in str(exc).lower() else f"corrupt ({exc})"
    return None


def is_image_file(path: Path) -> bool:
    """Whether `path` has a trained image extension (case-insensitive) and is not hidden.

    Hidden names are skipped like the labeling tool does: macOS writes `._photo.png` companions
    that are not images, Jupyter `.ipynb_checkpoints/` holds stale copies.
    """
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


@dataclass(frozen=True)
class MetadataTable:
    """The raw rows of a metadata.csv (header first), kept so it can be rewritten faithfully."""

    rows: list[list[str]]
    row_lines: list[int]  # the line each row starts on (quoted captions may span lines)
    file_column: int
    caption_column: int
    has_bom: bool


def read_metadata_table(metadata_path: Path) -> MetadataTable:
    """Parse `metadata_path`. Raises UserError if it is missing, not UTF-8, or has no known header."""
    if not metadata_path.is_file():
        raise UserError(f"metadata_path {metadata_path} does not exist; fix the path or remove it from the config")
    data = metadata_path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{metadata_path} is not UTF-8 text (bad byte at offset {exc.start}); "
            "re-save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, row_lines, previous_end = [], [], 0
    for row in reader:
        rows.append(row)
        row_lines.append(previous_end + 1)
        previous_end = reader.line_num
    header = [column.strip().lower() for column in rows[0]] if rows else []
    for file_column, caption_column in CAPTION_COLUMNS:
        if file_column in header and caption_column in header:
            return MetadataTable(rows, row_lines, header.index(file_column), header.index(caption_column),
                                 data.startswith(codecs.BOM_UTF8))
    expected = " or ".join(",".join(pair) for pair in CAPTION_COLUMNS)
    raise UserError(f"{metadata_path} has columns {rows[0] if rows else []}; expected a header row {expected}")


def normalized_row_path(root: Path, rel: str) -> Path:
    """The absolute path a metadata filename points to (backslashes accepted), not resolved."""
    return Path(os.path.normpath(root / rel.replace("\\", "/")))


def _index_metadata_rows(index: ImageIndex) -> None:
    assert index.metadata_path is not None
    table = read_metadata_table(index.metadata_path)
    if len(table.rows) < 2:
        raise UserError(f"{index.metadata_path} has a header but no rows; add one row per image")
    name = index.metadata_path.name
    listed: set[Path] = set()
    mentioned: set[Path] = set()  # every row's path, usable or not, so no image is reported twice
    for row, line in zip(table.rows[1:], table.row_lines[1:]):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name}:{line}"
        rel = _cell(row, table.file_column)
        caption = _cell(row, table.caption_column)
        if not rel:
            index.problems.append(DataProblem(BAD_ROW, where, "row has no filename", True))
            continue
        mentioned.add(normalized_row_path(index.root, rel))
        path = _path_inside(index.root, rel, where, index.problems)
        if path is None:
            continue
        if path in listed:
            index.problems.append(DataProblem(DUPLICATE_ROW, where, f"{rel} is listed again; this row is ignored", False))
            continue
        listed.add(path)
        if not path.is_file():
            index.problems.append(DataProblem(MISSING_FILE, where, f"{rel} does not exist in {index.root}", True))
            continue
        if not caption:
            index.problems.append(DataProblem(MISSING_CAPTION, rel, f"{where}: empty prompt for {rel}", False))
        index.records.append(ImageRecord(path, rel, caption, 1, where))
    for path in images_under(index.root):
        if path not in mentioned:
            rel = path.relative_to(index.root).as_posix()
            index.problems.append(DataProblem(UNLISTED_IMAGE, rel, f"{rel} is not listed in {name}; it will not be trained", False))


def _cell(row: list[str], column: int) -> str:
    return row[column].strip() if column < len(row) else ""


def _path_inside(root: Path, rel: str, where: str, problems: list[DataProblem]) -> Path | None:
    """`root/rel` as an absolute path, or None (with a blocking problem) if it leads outside root."""
    if Path(rel.replace("\\", "/")).is_absolute():
        problems.append(DataProblem(PATH_OUTSIDE_DATASET, where, f"{rel} is an absolute path; write it relative to {root}", True))
        return None
    path = normalized_row_path(root, rel)
    if not path.resolve().is_relative_to(root.resolve()):
        problems.append(DataProblem(PATH_OUTSIDE_DATASET, where, f"{rel} leads outside {root}; copy the image into the folder", True))
        return None
    return path


def images_under(root: Path) -> list[Path]:
    """All image files below root, sorted, except those in root/rejected/ (where `check-data --fix`
    moves files) and in hidden folders. The one folder walk of training, check-data and labeling."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _is_hidden(Path(name))
                         and not (Path(folder) == root and name == REJECTED_FOLDER)]
        found += [Path(folder) / name for name in files if is_image_file(Path(name))]
    return sorted(found)


def _index_caption_files(index: ImageIndex) -> None:
    for entry in sorted(index.root.iterdir()):
        if entry.is_dir():
            if entry.name != REJECTED_FOLDER and not _is_hidden(entry):
                _index_repeat_folder(index, entry)
        elif is_image_file(entry):
            _add_captioned_image(index, entry, repeats=1, folder_caption="")


def _index_repeat_folder(index: ImageIndex, folder: Path) -> None:
    match = _REPEAT_FOLDER.match(folder.name)
    repeats = int(match.group(1)) if match else 0
    if repeats < 1:
        index.problems.append(DataProblem(
            IGNORED_FOLDER, folder.name + "/",
            "folder name has no repeat count, so it is skipped; rename it like 1_" + folder.name, False))
        return
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not _is_hidden(entry):
            rel = entry.relative_to(index.root).as_posix() + "/"
            index.problems.append(DataProblem(IGNORED_FOLDER, rel, "folders inside a repeat folder are skipped", False))
        elif is_image_file(entry):
            _add_captioned_image(index, entry, repeats, folder_caption=match.group(2))


def _add_captioned_image(index: ImageIndex, image: Path, repeats: int, folder_caption: str) -> None:
    rel = image.relative_to(index.root).as_posix()
    if not image.resolve().is_relative_to(index.root.resolve()):
        index.problems.append(DataProblem(PATH_OUTSIDE_DATASET, rel, f"{rel} is a link to a file outside {index.root}", True))
        return
    caption_file = image.with_suffix(index.caption_extension)
    caption_rel = caption_file.relative_to(index.root).as_posix()
    if caption_file.is_file():
        try:
            lines = caption_file.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            index.problems.append(DataProblem(UNREADABLE_CAPTION, rel, f"{caption_rel} is not UTF-8 text; re-save it as UTF-8", True))
            return
        caption, source = (lines[0].strip() if lines else ""), caption_rel
        if not caption:
            index.problems.append(DataProblem(MISSING_CAPTION, rel, f"{caption_rel} is empty", False))
    elif folder_caption:
        caption, source = folder_caption, f"folder name {image.parent.name}"
    else:
        caption, source = "", ""
        index.problems.append(DataProblem(MISSING_CAPTION, rel, f"no {index.caption_extension} caption file beside {rel}", False))
    index.records.append(ImageRecord(Path(os.path.abspath(image)), rel, caption, repeats, source))
