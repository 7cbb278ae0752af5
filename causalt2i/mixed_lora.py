"""Mixed-adapter LoRA: one forward pass whose batch rows belong to different adapters (issue 15).

Each attn2 projection is wrapped by `MixedLoRALinear`, which holds the stacked factors of every slot of a
device slot pool (`causalt2i.slot_pool.SlotPool`):

    y_b = x_b · Wᵀ + bias + s_{k} · (x_b · A_kᵀ) · B_kᵀ + s_k · Δb_k,    k = slot(b)

A is [S, r_max, in], B is [S, out, r_max]: an adapter of rank r < r_max fills the first r ranks and leaves
zeros after them, which add exactly 0. Slot 0 is "no adapter" and stays all zeros with scale 0, so a base
row is x·Wᵀ + bias + 0 (a float sum with +0.0 is exact). The per-row gather `A[slots]` and the two
`torch.bmm` calls are one batched matmul for the whole batch, whatever mix of adapters it holds.

Identifier tokens: every tenant's `<s1>` is the same id (the first id past the base vocabulary, as
`AdapterHost` assigns them), so `SlotTokenEmbedding` looks ids past the vocabulary up in a per-slot table
`rows[slot(b), id - vocab]`; slot 0 reads the base table, which `AdapterHost` fills for the swap path.

Which slot each row uses travels in one `SlotRouter` shared by all wrapped modules: a fixed-size buffer
written in place (`copy_`) before each call, sliced to the call's batch size inside the forward. Factors,
scales and routing are buffers updated in place, never re-bound, so a `torch.compile`d U-Net sees the same
graph inputs (same shapes, dtypes, storages) across adapter changes and does not recompile.
"""

from __future__ import annotations

import torch
from torch import nn

from causalt2i.models import ATTN2_PROJECTIONS, attn2_modules

MAX_ROUTED_ROWS = 256  # rows a single call may route (U-Net rows = 2 × images with CFG)


class SlotRouter(nn.Module):
    """The slot of each batch row for the next forward call(s), shared by every wrapped layer."""

    def __init__(self, max_rows: int = MAX_ROUTED_ROWS):
        super().__init__()
        self.register_buffer("row_slots", torch.zeros(max_rows, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def route(self, slots: torch.Tensor | list[int]) -> None:
        """Rows 0..len(slots)-1 of the next calls use these slots (in place; larger batches are refused)."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        if slots.ndim != 1 or slots.numel() > self.row_slots.numel():
            raise ValueError(f"can route at most {self.row_slots.numel()} rows, got {tuple(slots.shape)}")
        self.row_slots.zero_()
        self.row_slots[: slots.numel()].copy_(slots.to(self.row_slots.device))

    def slots_for(self, batch: int) -> torch.Tensor:
        return self.row_slots[:batch]


class MixedLoRALinear(nn.Module):
    """A linear layer plus per-row LoRA from stacked slot factors. `base_layer` is the untouched nn.Linear
    (the name peft uses, so `models.attn2_state` and the swap path find the base tensors under it)."""

    def __init__(self, base_layer: nn.Linear, router: SlotRouter, n_slots: int, r_max: int):
        super().__init__()
        self.base_layer = base_layer
        # Not a submodule: one router is shared by every wrapped layer and must not be duplicated in state.
        self.__dict__["router"] = router
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer("lora_down", torch.zeros(n_slots, r_max, base_layer.in_features, **factory), persistent=False)
        self.register_buffer("lora_up", torch.zeros(n_slots, base_layer.out_features, r_max, **factory), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(n_slots, **factory), persistent=False)
        self.register_buffer("lora_bias", torch.zeros(n_slots, base_layer.out_features, **factory), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # diffusers' attention reads `to_q.weight` for dtype look-ups
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = x.shape[0]
        slots = self.router.slots_for(batch)
        flat = x.reshape(batch, -1, x.shape[-1]).to(self.lora_down.dtype)
        down = self.lora_down[slots]  # [B, r, in]
        up = self.lora_up[slots]  # [B, out, r]
        scale = self.lora_scale[slots]  # [B]
        delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))  # [B, T, out]
        delta = (delta + self.lora_bias[slots].unsqueeze(1)) * scale.view(batch, 1, 1)
        return y + delta.reshape(y.shape).to(y.dtype)


class SlotTokenEmbedding(nn.Module):
    """A token embedding whose ids past the base vocabulary come from the routed slot's rows."""

    def __init__(self, base: nn.Embedding, router: SlotRouter, vocab: int, n_slots: int, n_rows: int):
        super().__init__()
        self.base = base
        self.__dict__["router"] = router
        self.vocab = vocab
        self.n_rows = n_rows
        weight = base.weight
        self.register_buffer("slot_rows", torch.zeros(n_slots, n_rows, weight.shape[1], dtype=weight.dtype, device=weight.device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads `token_embedding.weight` (dtype, device, resize)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        batch = input_ids.shape[0]
        slots = self.router.slots_for(batch).view(batch, *([1] * (input_ids.ndim - 1)))
        offset = (input_ids - self.vocab).clamp(0, self.n_rows - 1)
        from_slot = (input_ids >= self.vocab) & (slots > 0)  # slot 0: the base table (the swap path's rows)
        rows = self.slot_rows[slots.expand_as(input_ids), offset]
        return torch.where(from_slot.unsqueeze(-1), rows.to(embeds.dtype), embeds)


def _token_embedding_owner(text_encoder: nn.Module) -> nn.Module:
    for module in text_encoder.modules():
        if hasattr(module, "token_embedding") and hasattr(module, "position_embedding"):
            return module
    raise RuntimeError(f"{type(text_encoder).__name__} has no CLIP token embedding")


def install_mixed_lora(unet: nn.Module, router: SlotRouter, n_slots: int, r_max: int) -> dict[str, MixedLoRALinear]:
    """Wrap every attn2 projection in `MixedLoRALinear`; returns them by module name (`...attn2.to_k`)."""
    layers: dict[str, MixedLoRALinear] = {}
    for module_name, attn in attn2_modules(unet).items():
        for projection in ATTN2_PROJECTIONS:
            parent_name, _, child = projection.rpartition(".")
            parent = attn.get_submodule(parent_name) if parent_name else attn
            linear = parent.get_submodule(child)
            if not isinstance(linear, nn.Linear):
                raise RuntimeError(f"{module_name}.{projection} is a {type(linear).__name__}, not a plain nn.Linear (LoRA already installed?)")
            wrapped = MixedLoRALinear(linear, router, n_slots, r_max)
            if isinstance(parent, nn.Sequential) or isinstance(parent, nn.ModuleList):
                parent[int(child)] = wrapped
            else:
                setattr(parent, child, wrapped)
            layers[f"{module_name}.{projection}"] = wrapped
    return layers


def install_slot_embeddings(text_encoder: nn.Module, router: SlotRouter, vocab: int, n_slots: int, n_rows: int) -> SlotTokenEmbedding:
    owner = _token_embedding_owner(text_encoder)
    if isinstance(owner.token_embedding, SlotTokenEmbedding):
        raise RuntimeError("slot embeddings are already installed on this text encoder")
    owner.token_embedding = SlotTokenEmbedding(owner.token_embedding, router, vocab, n_slots, n_rows)
    return owner.token_embedding
