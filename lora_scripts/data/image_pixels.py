"""Turn an image file into the pixel tensor the VAE encodes: upright, RGB, resized, cropped, maybe mirrored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lora_scripts.data.image_buckets import Placement

# EXIF orientations that turn the picture by 90 degrees (PIL's ImageOps.exif_transpose table).
_SIDEWAYS_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the picture is shown, after its EXIF rotation; reads only the header."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS_ORIENTATIONS:
            return height, width
    return width, height


def load_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF rotation applied) in RGB; transparent parts become white, as
    they look in a viewer, instead of whatever colour the hidden pixels hold."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def training_pixels(path: Path, placement: Placement, crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """The image resized to `placement.resized`, cropped at `crop` (left, top) to the bucket,
    optionally mirrored: a float tensor [3, height, width] in [-1, 1]."""
    image = load_rgb(path)
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    left, top = crop
    image = image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
