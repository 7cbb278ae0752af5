"""Random LoRA adapters for the mixed-batch tests, written by the real writer (`causalt2i.adapter.save_adapter`).

Every attn2 projection gets factors of `rank` (B non-zero, unlike a fresh peft init, so each adapter changes the
images by many levels), and random identifier-token rows. All adapters use the same token names by default
(`<s1>`, `<v1>`): different tenants' `<s1>` must then be told apart by their slot alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, save_adapter
from causalt2i.lora import LORA_A, LORA_B, attn2_projection_names
from causalt2i.models import SDXLParts

SUBJECTS = [{"token": "<s1>", "class_word": "cat"}, {"token": "<v1>", "class_word": "dog"}]
FACTOR_SCALE = 2.0  # B·A about twice W's std: images differ by several levels per pixel, still of the base's kind


def write_lora_adapter(out: Path, parts: SDXLParts, *, tenant: str, name: str, seed: int, rank: int = 4,
                       alpha: float = 8.0, subjects: list[dict] | None = None, dtype=torch.float32) -> Path:
    subjects = subjects or SUBJECTS
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in attn2_projection_names(parts.unet):
        linear = parts.unet.get_submodule(module)
        linear = getattr(linear, "base_layer", linear)
        out_features, in_features = linear.weight.shape
        std = float(linear.weight.float().std()) * FACTOR_SCALE / (alpha / rank)
        tensors[module + LORA_A] = (torch.randn((rank, in_features), generator=generator) * std ** 0.5 / rank ** 0.25).to(dtype)
        tensors[module + LORA_B] = (torch.randn((out_features, rank), generator=generator) * std ** 0.5 / rank ** 0.25).to(dtype)
    for key, encoder in ((TE1_ROWS, parts.text_encoder), (TE2_ROWS, parts.text_encoder_2)):
        width = encoder.get_input_embeddings().weight.shape[1]
        tensors[key] = torch.randn((len(subjects), width), generator=generator)
    save_adapter(out, tensors, {
        "base_model": parts.base_model, "base_fingerprint": parts.base_fingerprint(), "subjects": subjects,
        "param_mode": "lora", "lora_rank": rank, "lora_alpha": alpha, "dtype": str(dtype).removeprefix("torch."),
        "training": {"synthetic_seed": seed}, "tenant": tenant, "name": name, "step": 0})
    return out
