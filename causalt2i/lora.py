"""LoRA on the attn2 projections, through peft (`param_mode: lora`): W' = W + (α/r) · B A, B initialised to 0.

Training injects peft's own `LoraLayer`s (`peft.inject_adapter_in_model`), so the factors carry the names
diffusers and peft use: `<module>.<projection>.lora_A.weight` (A, [r, in]) and `.lora_B.weight` (B,
[out, r]), with `<module>` the diffusers module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`).
An adapter's tensors are exactly those keys; the diffusers export only adds the `unet.` prefix.

`LoRAFactors` is one module's update in the form everything downstream consumes (merging into a resident
base, the exports, a slot pool of stacked factors): A, B, alpha, and optionally the bias change that a
compressed full tune carries as `lora_B.bias` (peft's `lora_bias`). The scale is alpha / rank, as in peft.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from causalt2i.models import ATTN2_PROJECTIONS, attn2_modules

ADAPTER_NAME = "default"
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
LORA_B_BIAS = ".lora_B.bias"


@dataclass(frozen=True)
class LoRAFactors:
    """ΔW = (alpha / rank) · up @ down for one linear layer; Δb = (alpha / rank) · bias when present."""

    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank]
    alpha: float
    bias: torch.Tensor | None = None  # [out_features]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The merged update in fp32 on `device`, computed as peft's `get_delta_weight` does: (B @ A) · scale."""
        return (self.up.to(device).float() @ self.down.to(device).float()) * self.scale

    def delta_bias(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device).float() * self.scale


def attn2_projection_names(unet: nn.Module) -> list[str]:
    """The full module names of every attn2 projection LoRA adapts, e.g. `mid_block...attn2.to_out.0`."""
    return [f"{module}.{projection}" for module in attn2_modules(unet) for projection in ATTN2_PROJECTIONS]


def peft_config(ranks: dict[str, int], alphas: dict[str, float], *, dropout: float = 0.0, bias: bool = False) -> LoraConfig:
    """A peft `LoraConfig` for exactly these modules with these ranks and alphas.

    The most common rank and alpha become `r` / `lora_alpha`; any other module gets an anchored
    `rank_pattern` / `alpha_pattern` entry, which is how peft (and diffusers' loader) give modules of one
    adapter different ranks.
    """
    if set(ranks) != set(alphas) or not ranks:
        raise ValueError("give a rank and an alpha for every module, and at least one module")
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(ranks),
        rank_pattern={f"^{re.escape(name)}": r for name, r in sorted(ranks.items()) if r != rank},
        alpha_pattern={f"^{re.escape(name)}": a for name, a in sorted(alphas.items()) if a != alpha},
        lora_bias=bias,
        init_lora_weights=True,
    )


def install_lora(unet: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> dict[str, LoraLayer]:
    """Inject peft LoRA layers into every attn2 projection; returns them by module name.

    The factors are fp32 masters whatever the U-Net's dtype (METHOD.md, dtype policy); peft would otherwise
    give them the base layer's dtype. A starts from peft's Kaiming-uniform init (drawn from torch's global
    RNG, which the trainer seeds), B from zero, so the adapted U-Net starts equal to the base.
    """
    names = attn2_projection_names(unet)
    for name in names:
        if isinstance(unet.get_submodule(name), LoraLayer):
            raise RuntimeError(f"{name} already has LoRA")
    alpha = float(rank if alpha is None else alpha)
    config = peft_config({n: rank for n in names}, {n: alpha for n in names}, dropout=dropout)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    layers: dict[str, LoraLayer] = {}
    for name in names:
        layer = unet.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"peft did not adapt {name}")
        layer.lora_A[ADAPTER_NAME].to(torch.float32)
        layer.lora_B[ADAPTER_NAME].to(torch.float32)
        layers[name] = layer
    return layers


def lora_tensors(layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """The trainable factors by their peft/diffusers state-dict names (adapter name dropped)."""
    tensors = {}
    for name, layer in layers.items():
        tensors[name + LORA_A] = layer.lora_A[ADAPTER_NAME].weight
        tensors[name + LORA_B] = layer.lora_B[ADAPTER_NAME].weight
    return tensors


def layer_scale(layer: LoraLayer) -> float:
    return float(layer.scaling[ADAPTER_NAME])


def factors_from_tensors(tensors: dict[str, torch.Tensor], alpha_for_rank) -> dict[str, LoRAFactors]:
    """Group `<module>.lora_A.weight` / `.lora_B.weight` (/ `.lora_B.bias`) into `LoRAFactors` by module.

    `alpha_for_rank(rank)` gives a module's alpha from its rank (the manifest knows how). Raises
    `ValueError` for a module with only one factor or factors whose ranks disagree.
    """
    modules = sorted({key[: -len(LORA_A)] for key in tensors if key.endswith(LORA_A)} | {key[: -len(LORA_B)] for key in tensors if key.endswith(LORA_B)})
    factors = {}
    for module in modules:
        down, up = tensors.get(module + LORA_A), tensors.get(module + LORA_B)
        if down is None or up is None:
            raise ValueError(f"{module}: has only one of lora_A and lora_B")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"{module}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not form a rank-r pair")
        factors[module] = LoRAFactors(down=down, up=up, alpha=float(alpha_for_rank(int(down.shape[0]))), bias=tensors.get(module + LORA_B_BIAS))
    return factors


def factors_to_tensors(factors: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, f in factors.items():
        tensors[module + LORA_A] = f.down
        tensors[module + LORA_B] = f.up
        if f.bias is not None:
            tensors[module + LORA_B_BIAS] = f.bias
    return tensors
