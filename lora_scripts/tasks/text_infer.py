"""Text generation with a base model and a trained adapter (`lora-scripts generate`, the demo)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from lora_scripts.config import TrainConfig
from lora_scripts.data.text_files import read_rows
from lora_scripts.errors import UserError
from lora_scripts.models.llm import load_llm
from lora_scripts.tasks.base import GenerateRequest
from lora_scripts.tasks.text_data import make_sample_builder


def load_with_adapter(cfg: TrainConfig, adapter_dir: Path | None, lora_scale: float = 1.0):
    """Base model plus the adapter in `adapter_dir` (none: the bare base model), in eval mode."""
    model, tokenizer = load_llm(cfg.base_model)
    if adapter_dir is not None:
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"no trained adapter in {adapter_dir} (adapter_config.json missing); train first or pass --adapter FOLDER")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.scaling[name] *= lora_scale
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, add_special_tokens: bool, batch_size: int = 8) -> list[str]:
    """Greedy completions of already-rendered prompts, batched with left padding."""
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in generated[:, enc["input_ids"].shape[1] :]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def generate(cfg: TrainConfig, request: GenerateRequest) -> list[str]:
    """Render each prompt as training prompts were rendered, complete it with the trained LoRA;
    `>>> prompt` then the completion, for each prompt."""
    model, tokenizer = load_with_adapter(cfg, request.adapter, request.lora_scale)
    builder = make_sample_builder(cfg, tokenizer, read_rows(cfg.train_data_dir))
    rendered = [builder.prompt_text(p) for p in request.prompts]
    texts = generate_texts(model, tokenizer, rendered, request.max_new_tokens, add_special_tokens=not builder.is_chat)
    return [f">>> {prompt}\n{text}" for prompt, text in zip(request.prompts, texts)]
