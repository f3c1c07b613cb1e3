"""Finding dataset images (kohya `N_name` subfolders included) and opening them safely."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lora_scripts.data.image_index import images_under


def find_images(root: Path) -> list[str]:
    """Image paths under `root` (as training finds them: hidden files and folders and `rejected/`
    are skipped), relative to it with '/' separators, sorted."""
    return sorted(path.relative_to(root).as_posix() for path in images_under(root))


def load_images(root: Path, relative_paths: list[str]) -> tuple[list[str], list[Image.Image], dict[str, str]]:
    """Open the images as RGB, fully decoded.

    Returns the paths that loaded, their images, and `{path: reason}` for unreadable or truncated files.
    """
    loaded: list[str] = []
    images: list[Image.Image] = []
    failed: dict[str, str] = {}
    for relative in relative_paths:
        try:
            with Image.open(root / relative) as image:
                images.append(image.convert("RGB"))
            loaded.append(relative)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            failed[relative] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return loaded, images, failed
