"""Image task: a Stable Diffusion (SD1, SD2, SDXL) LoRA, saved for AUTOMATIC1111 / ComfyUI.

`preflight` checks the base model and dataset in seconds; `build_image_task` loads the model,
caches VAE latents (and text-encoder outputs when the encoder is frozen and captions fixed),
attaches PEFT LoRA on kohya's modules, and hands the shared loop a `TaskRun`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_scripts.config import TrainConfig
from lora_scripts.data.image_buckets import bucket_batcher
from lora_scripts.data.image_cache import CacheStats, LatentCache, LatentRequest, module_fingerprint
from lora_scripts.datacheck.caption_checks import tag_frequency
from lora_scripts.errors import UserError
from lora_scripts.export.lora_files import lora_modules, open_lora
from lora_scripts.launch import computed_once
from lora_scripts.export.kohya import (
    LoraTrainingFacts,
    kohya_metadata,
    load_kohya_into_peft,
    peft_to_kohya_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from lora_scripts.models.precision import compute_dtype
from lora_scripts.models.sd import SDComponents, load_sd_components
from lora_scripts.models.sd_detect import detect_sd_family, training_resolution
from lora_scripts.schedule import global_batch_size
from lora_scripts.tasks.base import NAN_ADVICE, DataReport, Progress, Task, TaskRun
from lora_scripts.tasks.image_data import ImageCollate, ImageSample, count_images, select_images
from lora_scripts.tasks.image_generate import DIFFUSERS_LORA_FILE, generate
from lora_scripts.tasks.image_model import LossSettings, SDLoRAModel, add_sd_lora, param_groups, tokenize
from lora_scripts.tasks.image_samples import SampleRenderer, read_sample_prompts
from lora_scripts.tracking import Tracker

DEFAULT_CACHE_FOLDER = ".lora_cache"


def preflight(cfg: TrainConfig) -> None:
    """Check the base model and every image before loading any weights (option combinations are
    the schema's job). Raises UserError naming the bad model or images."""
    family = detect_sd_family(cfg.base_model, cfg.model_family, cfg.allow_unsafe_pickle)
    if cfg.init_lora_path is not None:
        read_init_lora(cfg)
    select_images(cfg, training_resolution(cfg.resolution, family), report=True)
    read_sample_prompts(cfg.sample_prompts)


def read_init_lora(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS file named by `init_lora_weights`, checked against network_type,
    lora_rank and conv_dim (the exact factor shapes are checked as it loads)."""
    source = cfg.init_lora_path
    if source is None or source.suffix != ".safetensors" or not source.is_file():
        raise UserError(f"init_lora_weights {source}: expected an existing kohya/A1111 LoRA .safetensors file (e.g. a previous run's <output_name>.safetensors)")
    try:
        state = load_file(str(source))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"init_lora_weights {source}: not a readable safetensors file ({exc})") from None
    if not state or not all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in state):
        raise UserError(f"init_lora_weights {source}: not a kohya/A1111 LoRA (keys must start with lora_unet_ / lora_te…); for a diffusers LoRA folder, convert it or train anew")
    modules = lora_modules(open_lora(source))
    kinds = sorted({module.kind for module in modules})
    if kinds != [cfg.network_type]:
        raise UserError(f"init_lora_weights {source}: a {'/'.join(kinds)} file; set network_type: {kinds[0]}")
    plain = [module for module in modules if module.kind == "lora"]  # LoHa/LoKr factor shapes are checked as they load
    for key, wanted, ranks in (("lora_rank", cfg.lora_rank, {m.rank for m in plain if m.kernel[-2:] != (3, 3)}),
                               ("conv_dim", cfg.conv_dim, {m.rank for m in plain if m.kernel[-2:] == (3, 3)})):
        if ranks and ranks != {wanted}:
            raise UserError(f"init_lora_weights {source}: rank {sorted(ranks)} differs from {key} {wanted}; set {key}: {min(ranks)}")
    return state


def build_image_task(cfg: TrainConfig, device: str) -> TaskRun:
    """Load the base model and data, cache what stays fixed, attach LoRA; the TaskRun for the loop."""
    components, model, vae_id = load_model(cfg, device)
    resolution = training_resolution(cfg.resolution, components.family)
    samples = select_images(cfg, resolution, report=False)
    cache_note = "latents: encoded every step"
    if cfg.cache_latents:
        cache_note = cache_latents(model, samples, cfg, vae_id)
    text_cache = None
    if not cfg.train_text_encoder and not cfg.shuffle_caption:
        text_cache = computed_once(lambda: cache_text_outputs(model, components, samples, cfg.caption_dropout_rate > 0))
    unet_modules, text_modules = add_sd_lora(model, cfg)
    if cfg.init_lora_path is not None:
        source = f"init_lora_weights {cfg.init_lora_path}"
        loaded = load_kohya_into_peft(read_init_lora(cfg), model.unet, list(model.text_encoders), components.family, source)
        cache_note += f"; started from {cfg.init_lora_path} ({loaded} modules)"
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for encoder in model.text_encoders if cfg.train_text_encoder else []:
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batcher = bucket_batcher([s.placement.bucket for s in samples], [s.record.repeats for s in samples], global_batch_size(cfg.batch_size), cfg.seed)
    started_at = time.time()
    renderer = SampleRenderer(components, model, read_sample_prompts(cfg.sample_prompts), cfg.output_dir, resolution, cfg.sample_steps, cfg.seed)

    def after_step(progress: Progress, tracker: Tracker) -> None:
        due = cfg.sample_every_n_steps and progress.step % cfg.sample_every_n_steps == 0
        if renderer.prompts and (due or progress.step == progress.total_steps):
            renderer(progress.step, tracker)

    def save_adapter(folder: Path, name: str, progress: Progress) -> list[Path]:
        if cfg.save_format == "diffusers":
            save_diffusers_lora(folder, model.unet, list(model.text_encoders))
            return [folder / "pytorch_lora_weights.safetensors"]
        path = folder / f"{name}.safetensors"
        facts = training_facts(cfg, components.family, resolution, samples, started_at, progress)
        save_kohya_lora(path, peft_to_kohya_state_dict(model.unet, list(model.text_encoders), components.family), kohya_metadata(facts))
        return [path]

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = (
        f"{components.family} ({components.prediction_type}), resolution {resolution}; "
        f"{len(samples)} images ({sum(s.record.repeats for s in samples)} per epoch with repeats) in buckets "
        f"{bucket_counts(samples)}; {cache_note}; text encoder outputs {'computed every step' if text_cache is None else 'cached'}. "
        f"{network_summary(cfg)} on {unet_modules} UNet + {text_modules} text-encoder modules: "
        f"{trainable:,} trainable parameters"
    )
    return TaskRun(
        model=model,
        train_set=samples,
        eval_set=[],
        collate=ImageCollate(cfg, lambda captions: tokenize(components.tokenizers, captions), text_cache, components.family == "sdxl"),
        loss=lambda wrapped, batch: wrapped(batch),
        count_units=count_images,
        count_processed=count_images,
        save_adapter=save_adapter,
        unit_name="images",
        batcher=batcher,
        fingerprint={"base_model": str(cfg.base_model), "data": data_fingerprint(samples)},
        summary=summary,
        nan_advice=f"{NAN_ADVICE}; SDXL's VAE overflows in fp16: set no_half_vae: true",
        param_groups=param_groups(model, cfg),
        after_step=after_step,
    )


def load_model(cfg: TrainConfig, device: str) -> tuple[SDComponents, SDLoRAModel, str]:
    """The base model on `device` in the training dtypes (float32 VAE with no_half_vae), without
    LoRA yet, and the VAE's cache id (a hash of its float32 weights plus the dtype it runs in)."""
    components = load_sd_components(cfg.base_model, cfg.model_family, cfg.allow_unsafe_pickle, torch.float32, cfg.model_config_dir)
    weight_dtype = compute_dtype(cfg.mixed_precision, device)
    vae_dtype = torch.float32 if cfg.no_half_vae else weight_dtype
    vae_id = f"{module_fingerprint(components.vae)}-{vae_dtype}"
    if weight_dtype != torch.float32:
        for part in (components.unet, *components.text_encoders):
            part.to(weight_dtype)
        components.vae.to(vae_dtype)
    settings = LossSettings(components.prediction_type, cfg.train_text_encoder, cfg.noise_offset, cfg.min_snr_gamma)
    model = SDLoRAModel(components, settings).to(device).eval()
    return components, model, vae_id


def cache_latents(model: SDLoRAModel, samples: list[ImageSample], cfg: TrainConfig, vae_id: str) -> str:
    """Fill every sample's latents (and mirrored latents with flip_aug) once; returns a summary.
    With several processes the main one encodes (and writes the disk cache), the others receive.

    Raises UserError when the VAE gives non-finite latents (SDXL's VAE in fp16).
    """
    folder = (cfg.cache_dir or cfg.train_data_dir / DEFAULT_CACHE_FOLDER) if cfg.cache_latents_to_disk else None
    flips = [False, True] if cfg.flip_aug else [False]
    requests = [LatentRequest(s.record.path, s.content_hash, s.placement, s.placement.center_crop, flip)
                for flip in flips for s in samples]

    def fill() -> tuple[list[torch.Tensor], CacheStats]:
        cache = LatentCache(vae_id, folder)
        return cache.fill(requests, model.encode_pixels, cfg.batch_size), cache.stats

    latents, stats = computed_once(fill)
    if not all(torch.isfinite(latent).all() for latent in latents):
        raise UserError("the VAE produced non-finite latents (NaN/inf); with mixed_precision fp16 set no_half_vae: true")
    for i, sample in enumerate(samples):
        sample.latents = latents[i]
        if cfg.flip_aug:
            sample.latents_flipped = latents[len(samples) + i]
    where = f" (disk cache {folder})" if folder else ""
    return f"latents: {stats.encoded} encoded, {stats.from_disk} from disk cache{where}"


@torch.no_grad()
def cache_text_outputs(model: SDLoRAModel, components: SDComponents, samples: list[ImageSample],
                       with_empty: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Text-encoder outputs of every distinct caption (plus "" for caption dropout), on the CPU."""
    captions = sorted({s.record.caption for s in samples} | ({""} if with_empty else set()))
    device = next(model.unet.parameters()).device
    cache = {}
    for start in range(0, len(captions), 16):
        chunk = captions[start : start + 16]
        embeds, pooled = model.encode_text([ids.to(device) for ids in tokenize(components.tokenizers, chunk)])
        for i, caption in enumerate(chunk):
            cache[caption] = (embeds[i].float().cpu(), None if pooled is None else pooled[i].float().cpu())
    return cache


def training_facts(cfg: TrainConfig, family: str, resolution: int, samples: list[ImageSample],
                   started_at: float, progress: Progress) -> LoraTrainingFacts:
    """What the kohya metadata records about this run at its current step."""
    return LoraTrainingFacts(
        family=family, output_name=cfg.effective_output_name, base_model=cfg.base_model,
        network_dim=cfg.lora_rank, network_alpha=cfg.lora_alpha, resolution=(resolution, resolution),
        learning_rate=cfg.learning_rate, steps=progress.step, epoch=progress.epoch,
        seed=cfg.seed, training_started_at=started_at, training_finished_at=time.time(),
        unet_lr=cfg.learning_rate, text_encoder_lr=(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else None,
        mixed_precision=cfg.mixed_precision, lr_scheduler=cfg.lr_scheduler, batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_epochs=cfg.epochs,
        max_train_steps=progress.total_steps, num_train_images=sum(s.record.repeats for s in samples),
        noise_offset=cfg.noise_offset or None, min_snr_gamma=cfg.min_snr_gamma,
        tag_frequency=tag_frequency([s.record for s in samples]),
        network_module="networks.lora" if cfg.network_type == "lora" else "lycoris.kohya", network_args=network_args(cfg),
    )


def network_args(cfg: TrainConfig) -> dict[str, str]:
    """kohya's `ss_network_args`: the --network_args this run amounts to, as strings (kohya keeps the
    command line's text): LyCORIS' `algo`, LoCon's `conv_dim` / `conv_alpha`, `loraplus_lr_ratio`."""
    args = {"algo": cfg.network_type} if cfg.network_type != "lora" else {}
    if cfg.conv_dim:
        args |= {"conv_dim": str(cfg.conv_dim), "conv_alpha": f"{cfg.conv_alpha or cfg.conv_dim:g}"}
    if cfg.loraplus_lr_ratio:
        args["loraplus_lr_ratio"] = f"{cfg.loraplus_lr_ratio:g}"
    return args


def network_summary(cfg: TrainConfig) -> str:
    """The adapter in words, e.g. `LoCon r=4 alpha=4 (3x3 convs r=8 alpha=4), LoRA+ x16`."""
    name = {"loha": "LoHa", "lokr": "LoKr"}.get(cfg.network_type, "LoCon" if cfg.conv_dim else "LoRA")
    text = f"{name} r={cfg.lora_rank} alpha={cfg.lora_alpha:g}"
    if cfg.conv_dim:
        text += f" (3x3 convs r={cfg.conv_dim} alpha={cfg.conv_alpha or cfg.conv_dim:g})"
    return text + (f", LoRA+ x{cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else "")


def bucket_counts(samples: list[ImageSample]) -> str:
    """`64x64: 3, 128x64: 1`, by bucket."""
    counts: dict[tuple[int, int], int] = {}
    for sample in samples:
        counts[sample.placement.bucket] = counts.get(sample.placement.bucket, 0) + 1
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))


def data_fingerprint(samples: list[ImageSample]) -> str:
    """A hash of what the run trains on: image files and contents, captions, repeats, buckets."""
    rows = [[s.record.rel, s.content_hash, s.record.caption, s.record.repeats, s.placement.bucket] for s in samples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def image_data_report(cfg: TrainConfig, embeddings_file: Path | None) -> DataReport:
    """Doctor findings for the image folder, and the fixes `--fix` applies (move, shrink)."""
    import numpy as np

    from lora_scripts.data.image_index import index_image_dataset
    from lora_scripts.datacheck import check_image_dataset, fix_dataset

    index = index_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    resolution = cfg.resolution
    if resolution is None:  # the family decides; a model not downloaded yet counts as SD1
        family = cfg.model_family or (detect_sd_family(cfg.base_model) if Path(cfg.base_model).exists() else "sd1")
        resolution = training_resolution(None, family)
    embeddings = None
    if embeddings_file is not None:
        if not embeddings_file.is_file():
            raise UserError(f"--embeddings {embeddings_file}: file not found; write it with `lora-scripts label --input DIR --embeddings-out FILE.npz`")
        with np.load(embeddings_file) as data:
            embeddings = {key: data[key] for key in data.files}
    report = check_image_dataset(index, resolution, embeddings=embeddings)
    return DataReport(report, fix=lambda max_side: fix_dataset(index, report, max_side=max_side))


def export_diffusers(cfg: TrainConfig) -> list[str]:
    """The finished kohya LoRA also in diffusers' layout, `pytorch_lora_weights.safetensors`."""
    from lora_scripts.export.convert_image import convert_image_lora

    base = Path(cfg.base_model)
    _, written, modules = convert_image_lora(cfg.output_dir / f"{cfg.effective_output_name}.safetensors", "diffusers",
                                             cfg.output_dir / DIFFUSERS_LORA_FILE, family=cfg.model_family,
                                             base=base if base.is_dir() else None)
    return [f"diffusers LoRA written to {written} ({modules} modules; pipe.load_lora_weights(\"{cfg.output_dir}\"))"]


TASK = Task(name="image", preflight=preflight, build=build_image_task, data_report=image_data_report,
            generate=generate, exports={"diffusers": export_diffusers})
