"""One denoising pass for requests of different LoRA adapters (issue 15), each row routed to its own slot.

The same sampler, noise and conventions as `causalt2i.generation.generate` (see there): per-image CPU noise
from its own seed, DPM-Solver++ multistep, CFG against the request's own negative prompt (zeros when
empty) at the request's own guidance scale, time ids (h, w, 0, 0, h, w). What may differ between the
requests of one pass: prompt, negative prompt, guidance, seeds, adapter. What must be equal (`pass_key`):
steps, size and whether CFG runs, since they fix the timesteps, the latent shape and the U-Net's batch.

Row layout of the U-Net batch with CFG: [negatives of every image..., positives of every image...], and
each image's negative row uses its request's slot too (its negative prompt may name the adapter's tokens).
Prompts are encoded in one batched call per text encoder, each row through its own slot's token rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from causalt2i.generation import (
    _vae_scale,
    denoise,
    unet_conditions,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    SIZE_MULTIPLE,
    decode_latents,
    initial_latents,
    make_scheduler,
    size_range,
)
from causalt2i.models import SDXLParts
from causalt2i.slot_pool import SlotPool
from causalt2i.text import encode_tokenized, tokenize_prompts

from PIL import Image


@dataclass(frozen=True)
class RoutedRequest:
    """A request and the pool slot of its adapter (0: the base), with that adapter's identifier-token ids."""

    request: GenerationRequest
    slot: int
    token_ids: dict[str, int]


def pass_key(request: GenerationRequest, parts: SDXLParts) -> tuple:
    """Requests with equal keys can share one mixed pass."""
    return (request.steps, request.size(parts), request.guidance > 1.0)


def _encode(parts: SDXLParts, pool: SlotPool, prompts: list[str], slots: list[int], token_maps: list[dict[str, int]], field: str):
    """Each prompt tokenized with its own adapter's tokens, then one batched encoder call routed per row."""
    rows = [tokenize_prompts(parts, [prompt], token_ids, field=field) for prompt, token_ids in zip(prompts, token_maps)]
    merged = type(rows[0])(
        ids_1=torch.cat([r.ids_1 for r in rows]), ids_2=torch.cat([r.ids_2 for r in rows]),
        lengths=torch.cat([r.lengths for r in rows]), eos_positions_2=torch.cat([r.eos_positions_2 for r in rows]))
    pool.route(slots)
    return encode_tokenized(parts, merged)


@torch.no_grad()
def generate_mixed(parts: SDXLParts, pool: SlotPool, routed: Sequence[RoutedRequest], *,
                   progress: ProgressCallback | None = None) -> list[GenerationResult]:
    """Sample every request in one pass; result i belongs to `routed[i]` (its images in seed order)."""
    if not routed:
        return []
    keys = {pass_key(item.request, parts) for item in routed}
    if len(keys) != 1:
        raise GenerationError("request", f"requests of one mixed pass must share steps, size and CFG; got {sorted(keys)}")
    steps, (width, height), use_cfg = keys.pop()
    low, high = size_range(parts.default_resolution)
    for name, side in (("width", width), ("height", height)):
        if side % SIZE_MULTIPLE or not low <= side <= high:
            raise GenerationError(name, f"must be a multiple of {SIZE_MULTIPLE} within {low}..{high} for this base model, got {side}")
    device = parts.device
    unet_dtype = next(parts.unet.parameters()).dtype
    counts = [len(item.request.image_seeds()) for item in routed]
    seeds = [seed for item in routed for seed in item.request.image_seeds()]
    image_slots = [item.slot for item, count in zip(routed, counts) for _ in range(count)]
    slots = [item.slot for item in routed]
    token_maps = [item.token_ids for item in routed]
    timings: dict[str, float] = {}

    def per_image(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[i : i + 1].expand(count, *tensor.shape[1:]) for i, count in enumerate(counts)])

    started = time.perf_counter()
    positive = _encode(parts, pool, [item.request.prompt for item in routed], slots, token_maps, "prompt")
    embeds, pooled = per_image(positive.embeds), per_image(positive.pooled)
    guidance = torch.tensor([item.request.guidance for item, count in zip(routed, counts) for _ in range(count)],
                            dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    if use_cfg:
        negative_embeds = torch.zeros_like(positive.embeds)
        negative_pooled = torch.zeros_like(positive.pooled)
        with_negative = [i for i, item in enumerate(routed) if item.request.negative_prompt.strip()]
        if with_negative:
            negative = _encode(parts, pool, [routed[i].request.negative_prompt for i in with_negative],
                               [slots[i] for i in with_negative], [token_maps[i] for i in with_negative], "negative_prompt")
            negative_embeds[with_negative] = negative.embeds
            negative_pooled[with_negative] = negative.pooled
        embeds = torch.cat([per_image(negative_embeds), embeds])
        pooled = torch.cat([per_image(negative_pooled), pooled])
        unet_slots = image_slots + image_slots
    else:
        unet_slots = image_slots
    embeds, added_cond = unet_conditions(embeds, pooled, height, width, unet_dtype, device)
    timings["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    scheduler = make_scheduler(parts)
    scheduler.set_timesteps(steps, device=device)
    scale = _vae_scale(parts)
    latents = initial_latents(seeds, (parts.unet.config.in_channels, height // scale, width // scale)).to(device) * scheduler.init_noise_sigma
    pool.route(unet_slots)
    try:
        latents = denoise(parts, scheduler, latents, embeds, added_cond, use_cfg, guidance, unet_dtype, progress)
    finally:
        pool.route([])  # slot 0 everywhere again: a later swap-path pass must not read this batch's slots
    timings["denoise"] = time.perf_counter() - started

    started = time.perf_counter()
    pixels = decode_latents(parts, latents)
    timings["decode"] = time.perf_counter() - started
    results, offset = [], 0
    for count in counts:
        block = pixels[offset : offset + count]
        images = [Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB") for image in block]
        results.append(GenerationResult(images=images, pixels=block, seeds=seeds[offset : offset + count], timings=timings))
        offset += count
    return results

