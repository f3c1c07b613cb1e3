"""Edit one image's caption where the trainer reads it, atomically (as `check-data --fix` and
`lora-scripts label` write): the metadata.csv row, or the caption file beside the image."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lora_scripts.atomic import write_bytes_atomically
from lora_scripts.data.image_index import ImageIndex, normalized_row_path, read_metadata_table
from lora_scripts.errors import UserError


def write_caption(index: ImageIndex, rel: str, caption: str) -> Path:
    """Set the caption of the image `rel` of `index`; returns the file written.

    A caption is one line (kohya reads the first line of a caption file): line breaks become
    spaces. Raises UserError if `rel` is not an image of the dataset.
    """
    record = next((r for r in index.records if r.rel == rel), None)
    if record is None:
        raise UserError(f"{rel} is not an image of {index.root}; reload the caption list")
    caption = " ".join(caption.split())
    if index.metadata_path is None:
        target = record.path.with_suffix(index.caption_extension)
        write_bytes_atomically(target, caption.encode("utf-8"))
        return target
    table = read_metadata_table(index.metadata_path)
    rows = [list(row) for row in table.rows]
    for row in rows[1:]:
        if len(row) > table.file_column and normalized_row_path(index.root, row[table.file_column].strip()) == record.path:
            row.extend([""] * (table.caption_column + 1 - len(row)))
            row[table.caption_column] = caption
            break
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_bytes_atomically(index.metadata_path, (b"\xef\xbb\xbf" if table.has_bom else b"") + buffer.getvalue().encode("utf-8"))
    return index.metadata_path
