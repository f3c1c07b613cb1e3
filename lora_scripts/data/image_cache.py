"""VAE latents computed once per image, kept in memory and optionally on disk across runs.

A latent is keyed by what determines it: the image file's bytes, its bucket, resize and crop,
the mirror flag, and the VAE (a hash of its weights and dtype). Change any of them and the key
changes, so a stale cache is never used. Disk entries are `<key>.safetensors` files written to
a temporary name and renamed, so a killed run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_scripts.atomic import write_atomically
from lora_scripts.data.image_buckets import Placement
from lora_scripts.data.image_pixels import training_pixels
from lora_scripts.errors import UserError

# Bump when the preprocessing changes in a way the key does not capture.
CACHE_VERSION = 1


@dataclass(frozen=True)
class LatentRequest:
    """One latent to produce: which image, how it is placed and cropped, mirrored or not."""

    path: Path
    content_hash: str
    placement: Placement
    crop: tuple[int, int]
    flip: bool


@dataclass
class CacheStats:
    """What a cache fill did: latents encoded by the VAE, and latents read from disk."""

    encoded: int = 0
    from_disk: int = 0


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights, their names, shapes and dtypes (identifies the VAE)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """Latents by key, in memory and, when `folder` is given, in `folder` on disk."""

    def __init__(self, vae_fingerprint: str, folder: Path | None) -> None:
        self.vae_fingerprint = vae_fingerprint
        self.folder = folder
        self.stats = CacheStats()
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cache_dir {folder}: cannot create it ({exc.strerror}); set cache_dir to a writable folder") from None

    def key(self, request: LatentRequest) -> str:
        """The cache key of a request (hex)."""
        facts = [CACHE_VERSION, self.vae_fingerprint, request.content_hash, request.placement.bucket,
                 request.placement.resized, request.crop, request.flip]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]

    def fill(
        self, requests: Sequence[LatentRequest], encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int
    ) -> list[torch.Tensor]:
        """The latent of every request, in order: read from disk when present, else encoded with
        `encode` (pixels [B, 3, H, W] -> latents [B, C, h, w]) in batches of one bucket."""
        keys = [self.key(request) for request in requests]
        found: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            latent = self._read(key)
            if latent is not None:
                found[key] = latent
                self.stats.from_disk += 1
        missing = [(key, request) for key, request in dict(zip(keys, requests)).items() if key not in found]
        by_bucket: dict[tuple[int, int], list[tuple[str, LatentRequest]]] = {}
        for key, request in missing:
            by_bucket.setdefault(request.placement.bucket, []).append((key, request))
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                pixels = torch.stack([training_pixels(r.path, r.placement, r.crop, r.flip) for _, r in chunk])
                for (key, _), latent in zip(chunk, encode(pixels)):
                    found[key] = latent.detach().float().cpu().contiguous()
                    self._write(key, found[key])
                    self.stats.encoded += 1
        return [found[key] for key in keys]

    def _read(self, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latents"]
        except (SafetensorError, OSError, KeyError):
            return None  # damaged entry: encode again and overwrite it

    def _write(self, key: str, latent: torch.Tensor) -> None:
        if self.folder is None:
            return
        write_atomically(self.folder, lambda tmp: save_file({"latents": latent}, str(tmp / f"{key}.safetensors")))
