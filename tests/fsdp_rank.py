"""One rank of test_distributed's FSDP check, on CPU over gloo: accelerate runs FSDP on GPUs only,
so the model is sharded with torch's own FSDP2 (`fully_shard`, what accelerate's FSDP2 applies).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.fsdp_rank MODEL_DIR OUT_DIR

Trains a PEFT LoRA on the tiny Llama for two steps with each rank on its half of a global batch,
saves it the way the loop does (`full_parameters` + the task's PEFT save, `optimizer_state`),
restores that into a freshly sharded model (`load_trainable_state`, `load_optimizer_state`), takes
one more step with both, and writes (main process) the adapter and both models' LoRA weights.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from lora_scripts.checkpoint import full_parameters, load_optimizer_state, load_trainable_state, optimizer_state
from lora_scripts.launch import end_process_group

GLOBAL_BATCH, LENGTH, LR = 4, 12, 1e-2


def lora_model(model_dir: str) -> PeftModel:
    """The tiny Llama with a seeded LoRA (B random too, so every factor trains from step one)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))


def global_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def sharded(model_dir: str) -> tuple[PeftModel, torch.optim.Optimizer]:
    model = lora_model(model_dir)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole LoRA tensors (every rank must call it)."""
    with full_parameters(model):
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main(model_dir: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, half = dist.get_rank(), GLOBAL_BATCH // dist.get_world_size()
    model, optimizer = sharded(model_dir)
    ids = global_batch(model.config.vocab_size)[rank * half : (rank + 1) * half]
    for _ in range(2):
        train_step(model, optimizer, ids)

    state = [optimizer_state(model, optimizer)]  # whole on the main process, as a checkpoint holds it
    if rank == 0:  # written and read back as a checkpoint does (it must not share tensors with `optimizer`)
        buffer = io.BytesIO()
        torch.save(state[0], buffer)
        state = [torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)]
    dist.broadcast_object_list(state, src=0)  # as the loop's resume hands it to every process
    params = lora_weights(model)
    with full_parameters(model):
        if rank == 0:
            model.save_pretrained(str(out / "adapter"))
    restored, restored_optimizer = sharded(model_dir)
    load_trainable_state(restored, params)
    load_optimizer_state(restored, restored_optimizer, state[0])

    train_step(model, optimizer, ids)
    train_step(restored, restored_optimizer, ids)
    continued, resumed = lora_weights(model), lora_weights(restored)
    if rank == 0:
        save_file({f"continued.{k}": v for k, v in continued.items()} | {f"resumed.{k}": v for k, v in resumed.items()}, str(out / "step3.safetensors"))
    end_process_group()  # the loop's own way out of the group (a bare destroy can abort the process)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
