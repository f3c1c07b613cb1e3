"""Loading a local transformers CLIP folder and computing normalised image/text embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from lora_scripts.errors import UserError

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

DOWNLOAD_HINT = (
    "Download it once (e.g. `hf download openai/clip-vit-base-patch32 --local-dir models/clip`) "
    "and pass --model models/clip"
)


def _check_clip_folder(folder: Path) -> None:
    """Raise UserError unless `folder` looks like a saved transformers CLIPModel."""
    if folder.is_file():
        # open_clip checkpoints need open_clip's torchvision-based code, which is not a dependency here.
        raise UserError(f"--model {folder} is a file; pass a transformers CLIP folder instead. {DOWNLOAD_HINT}")
    if not folder.is_dir():
        raise UserError(f"CLIP model folder not found: {folder}. {DOWNLOAD_HINT}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a transformers CLIP folder. {DOWNLOAD_HINT}")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{config_path} is not a valid transformers config (expected a JSON object)") from exc
    if model_type != "clip":
        raise UserError(f"{folder} holds a {model_type!r} model, not CLIP (config.json model_type must be 'clip')")


@dataclass
class ClipEncoder:
    """A CLIPModel with its processor, producing L2-normalised embeddings."""

    model: CLIPModel
    processor: CLIPProcessor
    device: torch.device

    @classmethod
    def load(cls, folder: Path, device: str) -> ClipEncoder:
        """Load from a local folder only (never the network). Raises UserError if it is missing or broken."""
        _check_clip_folder(folder)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
        # Imported here: checking the folder and building the CLI must not pay for loading transformers.
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        previous_verbosity = hf_logging.get_verbosity()
        # Without torchvision transformers falls back to the PIL CLIPImageProcessor and warns
        # "install torchvision"; that processor is the reference CLIP preprocessing, so hush it.
        hf_logging.set_verbosity_error()
        try:
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(f"cannot load the CLIP processor/tokenizer from {folder}: {reason}") from exc
        finally:
            hf_logging.set_verbosity(previous_verbosity)
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the CLIP weights from {folder}: {str(exc).splitlines()[0]}") from exc
        return cls(model=model.eval().to(device), processor=processor, device=torch.device(device))

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, applied to cosine similarities before the softmax."""
        return self.model.logit_scale.exp().item()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] unit vectors."""
        inputs = self.processor(
            text=texts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[len(images), dim] unit vectors."""
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
