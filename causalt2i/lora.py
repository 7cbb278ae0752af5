"""Rank-r LoRA on the attn2 projections (`param_mode: lora`): W' = W + (α/r) · B A, with B initialised to 0."""

from __future__ import annotations

import math

import torch
from torch import nn

from causalt2i.models import ATTN2_PROJECTIONS, attn2_modules


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        return self.base(x) + update.to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The merged weight update (α/r) · B A, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def install_lora(unet: nn.Module, rank: int) -> dict[str, LoRALinear]:
    """Wrap every attn2 projection of the U-Net in a `LoRALinear`; returns them by diffusers name."""
    wrapped: dict[str, LoRALinear] = {}
    for module_name, attention in attn2_modules(unet).items():
        for projection in ATTN2_PROJECTIONS:
            parent_name, _, child = projection.rpartition(".")
            parent = attention.get_submodule(parent_name) if parent_name else attention
            base = parent.get_submodule(child)
            if isinstance(base, LoRALinear):
                raise RuntimeError(f"{module_name}.{projection} already has LoRA")
            lora = LoRALinear(base, rank).to(base.weight.device)
            if isinstance(parent, nn.ModuleList):
                parent[int(child)] = lora
            else:
                setattr(parent, child, lora)
            wrapped[f"{module_name}.{projection}"] = lora
    return wrapped


def lora_tensors(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The LoRA factors in the adapter's naming: `<module>.<projection>.lora_A.weight` / `.lora_B.weight`."""
    tensors = {}
    for name, lora in wrapped.items():
        tensors[f"{name}.lora_A.weight"] = lora.lora_A
        tensors[f"{name}.lora_B.weight"] = lora.lora_B
    return tensors
