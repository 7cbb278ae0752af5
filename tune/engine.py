"""The causalt2i trainer under DeepSpeed: ZeRO-2 by default, bf16 on GPU, the same path on CPU with gloo.

The `Trainer` keeps what it owns (data order, noise stream, step, losses); DeepSpeed takes over the
optimizer step and the checkpointing of trainable tensors and (sharded) optimizer state. The trainer's
progress state rides along as DeepSpeed `client_state`, so a restore is as exact as a local resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

from causalt2i.trainer import Trainer
from tune.ds_ops import use_prebuilt_ops

CHECKPOINT_TAG = "ct2i"


def deepspeed_config(*, on_cuda: bool, zero_stage: int = 2) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": on_cuda, "contiguous_gradients": True},
        # Our AdamW carries three param groups with their own learning rates (METHOD.md).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if on_cuda:
        config["bf16"] = {"enabled": True}
    return config


class DeepSpeedOptimizerStep:
    def __init__(self, engine):
        self.engine = engine

    def __call__(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


def attach_deepspeed(trainer: Trainer, *, zero_stage: int = 2):
    """Wrap the trainer's model and optimizer in a DeepSpeed engine; the process group must already exist."""
    use_prebuilt_ops()  # DeepSpeed's CPU comm op, built at `make setup` (tune.ds_ops)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=trainer.model,
        optimizer=trainer.optimizer,
        lr_scheduler=trainer.lr_schedule,
        config=deepspeed_config(on_cuda=trainer.device.type == "cuda", zero_stage=zero_stage),
        dist_init_required=False,
    )
    trainer.optimizer_step = DeepSpeedOptimizerStep(engine)
    return engine


def fp32_masters(trainer: Trainer, engine) -> dict[str, torch.Tensor] | None:
    """The fp32 master values of the trainable tensors when the engine trains in bf16, else None.

    Under bf16 the module holds bf16 copies and the fp32 masters live in DeepSpeed's optimizer partitions;
    exporting from the copies would store bf16-rounded ΔW and LoRA factors (issue 14's precision bound).
    Gathering a partitioned master is collective, so every rank must call this.
    """
    if not engine.bfloat16_enabled():
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(tensor).detach().to("cpu") for name, tensor in trainer.model.named_trainable().items()}


def save_deepspeed_checkpoint(trainer: Trainer, engine, directory: str | Path) -> None:
    """Called on every rank: each writes its optimizer shard; rank 0 also writes the trainable tensors."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"progress": trainer.progress_state()}, exclude_frozen_parameters=True)


def load_deepspeed_checkpoint(trainer: Trainer, engine, directory: str | Path) -> int:
    _, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False)
    if client_state is None:
        raise RuntimeError(f"{directory} holds no DeepSpeed checkpoint tagged {CHECKPOINT_TAG!r}")
    trainer.load_progress_state(client_state["progress"])
    return trainer.step
