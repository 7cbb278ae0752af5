"""Generation from a loaded SDXL base with zero or one adapter (METHOD.md, "Inference").

The sampler is DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler`, configured from the
base's own noise schedule) with classifier-free guidance against a negative prompt. Choices a caller can
rely on:

- Each image's starting noise comes from its own CPU generator seeded with that image's seed, so a seed
  gives the same noise on any device and an image does not depend on which other seeds share its batch's
  noise. DPM-Solver++ (not the SDE variant) draws no further noise, so the seed fixes the image.
- CFG runs when guidance > 1, as in diffusers' pipelines; at guidance ≤ 1 the conditional prediction is
  used alone and the negative prompt is not encoded.
- An empty negative prompt is a zero embedding, as SDXL's pipeline does (`force_zeros_for_empty_prompt`).
- Prompts longer than 77 tokens (with BOS/EOS) are an error naming the field, never truncated: a cut
  prompt silently drops the end of the caller's description, often a subject.
- The timestep reaches the U-Net as a tensor; a Python int would make `torch.compile` recompile at every
  step.
- SDXL's `time_ids` are (height, width, 0, 0, height, width): original size = target size, no crop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from causalt2i.adapter import Adapter, AdapterError, AdapterHost
from causalt2i.errors import FieldError, field_error
from causalt2i.models import SDXLParts
from causalt2i.text import PromptError, encode_prompts

from causalt2i.limits import (  # noqa: E402,F401  (the limits are re-exported: callers import them from here)
    ABSOLUTE_MAX_SIDE,
    ABSOLUTE_MIN_SIDE,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    SIZE_MULTIPLE,
    GuidanceScale,
    ImageCount,
    SamplingSteps,
    Seed,
)

ProgressCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


class GenerationError(FieldError):
    """A generation that must not run. `field` names the offending input (e.g. `steps`, `adapter`)."""


def size_range(default_resolution: int) -> tuple[int, int]:
    """The allowed width/height range for a base trained at `default_resolution` px.

    A quarter to four times its native side, within 32..2048: tiny (64) allows 32..256, SDXL (1024)
    256..2048. Far outside its training sizes a U-Net makes noise, and a side past 2048 only exhausts memory.
    """
    return max(ABSOLUTE_MIN_SIDE, default_resolution // 4), min(ABSOLUTE_MAX_SIDE, default_resolution * 4)


class GenerationRequest(BaseModel):
    """One generation call. Validate with `parse_request(data, parts)` to also check sizes against the base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, description="may use the adapter's identifier tokens, e.g. `a <s1> cat`")]
    negative_prompt: Annotated[str, Field(description="what CFG steers away from; empty = a zero embedding")] = ""
    steps: SamplingSteps = DEFAULT_STEPS
    guidance: GuidanceScale = DEFAULT_GUIDANCE
    width: Annotated[int | None, Field(description="pixels, a multiple of 8; null = the base's native size")] = None
    height: Annotated[int | None, Field(description="pixels, a multiple of 8; null = the base's native size")] = None
    n: ImageCount = 1
    seed: Annotated[Seed, Field(description="image i uses seed + i unless `seeds` is given")] = 0
    seeds: Annotated[list[Seed] | None, Field(description="one seed per image (length n)")] = None

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
        low, high = (info.context or {}).get("size_range", (ABSOLUTE_MIN_SIDE, ABSOLUTE_MAX_SIDE))
        if not low <= value <= high:
            raise ValueError(f"must be within {low}..{high} for this base model, got {value}")
        return value

    @model_validator(mode="after")
    def _seeds_match_n(self) -> GenerationRequest:
        if self.seeds is not None and len(self.seeds) != self.n:
            raise GenerationError("seeds", f"has {len(self.seeds)} seeds for n={self.n} images; give one per image")
        return self

    def image_seeds(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.n)]

    def size(self, parts: SDXLParts) -> tuple[int, int]:
        """(width, height) in pixels, the base's native side where unset."""
        return self.width or parts.default_resolution, self.height or parts.default_resolution


def _generation_error(err: ValidationError) -> GenerationError:
    found = field_error(err)
    return found if isinstance(found, GenerationError) else GenerationError(found.field or "request", found.message)


def parse_request(data: dict | GenerationRequest, parts: SDXLParts | None = None) -> GenerationRequest:
    """Validate a request; with `parts`, width and height are also checked against that base's range.

    Raises `GenerationError` naming the first bad field.
    """
    if isinstance(data, GenerationRequest):
        data = data.model_dump(exclude_unset=True)
    context = {"size_range": size_range(parts.default_resolution)} if parts is not None else None
    try:
        return GenerationRequest.model_validate(data, context=context)
    except ValidationError as err:
        raise _generation_error(err) from None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    pixels: torch.Tensor  # [n, 3, H, W] uint8 on the CPU: exactly the pixels of `images`
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, denoise, decode

    def as_float(self) -> torch.Tensor:
        """[n, 3, H, W] float32 in [0, 1], the input convention of the metric extractors."""
        return self.pixels.float() / 255.0


def make_scheduler(parts: SDXLParts) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ multistep on the base's own training schedule (betas, spacing, prediction type)."""
    return DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config, algorithm_type="dpmsolver++")


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[n, C, h, w] float32 standard normal noise on the CPU, image i drawn from its own generator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])


def _vae_scale(parts: SDXLParts) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def generate(
    parts: SDXLParts,
    request: GenerationRequest,
    *,
    token_ids: dict[str, int] | None = None,
    progress: ProgressCallback | None = None,
) -> GenerationResult:
    """Sample `request.n` images from the base as it is now (with whatever adapter is applied to it).

    `token_ids` maps the applied adapter's identifier tokens to their slots (`AdapterHost.token_ids`).
    Raises `GenerationError` for a size outside the base's range and `PromptError` (which names
    `prompt` or `negative_prompt`) for an unknown identifier token or an over-long prompt, before any
    denoising runs.
    """
    low, high = size_range(parts.default_resolution)
    width, height = request.size(parts)
    for name, side in (("width", width), ("height", height)):
        if side % SIZE_MULTIPLE or not low <= side <= high:
            raise GenerationError(name, f"must be a multiple of {SIZE_MULTIPLE} within {low}..{high} for this base model, got {side}")
    device = parts.device
    unet_dtype = _module_dtype(parts.unet)
    seeds = request.image_seeds()
    count = len(seeds)
    use_cfg = request.guidance > 1.0
    timings: dict[str, float] = {}

    started = time.perf_counter()
    positive = encode_prompts(parts, [request.prompt], token_ids, field="prompt")
    embeds, pooled = positive.embeds.expand(count, -1, -1), positive.pooled.expand(count, -1)
    if use_cfg:
        if request.negative_prompt.strip():
            negative = encode_prompts(parts, [request.negative_prompt], token_ids, field="negative_prompt")
            negative_embeds, negative_pooled = negative.embeds, negative.pooled
        else:
            negative_embeds, negative_pooled = torch.zeros_like(positive.embeds), torch.zeros_like(positive.pooled)
        embeds = torch.cat([negative_embeds.expand(count, -1, -1), embeds])
        pooled = torch.cat([negative_pooled.expand(count, -1), pooled])
    embeds, added_cond = unet_conditions(embeds, pooled, height, width, unet_dtype, device)
    timings["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    scheduler = make_scheduler(parts)
    scheduler.set_timesteps(request.steps, device=device)
    scale = _vae_scale(parts)
    latent_shape = (parts.unet.config.in_channels, height // scale, width // scale)
    # The scheduler's arithmetic stays in float32 whatever the U-Net's dtype.
    latents = initial_latents(seeds, latent_shape).to(device) * scheduler.init_noise_sigma
    latents = denoise(parts, scheduler, latents, embeds, added_cond, use_cfg, request.guidance, unet_dtype, progress)
    timings["denoise"] = time.perf_counter() - started

    started = time.perf_counter()
    pixels = decode_latents(parts, latents)
    timings["decode"] = time.perf_counter() - started
    images = [Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB") for image in pixels]
    return GenerationResult(images=images, pixels=pixels, seeds=seeds, timings=timings)


def unet_conditions(embeds: torch.Tensor, pooled: torch.Tensor, height: int, width: int, unet_dtype: torch.dtype,
                    device) -> tuple[torch.Tensor, dict]:
    """The U-Net's text states and SDXL's added conditions (pooled text, size/crop time ids), one row per U-Net row."""
    embeds = embeds.to(device, unet_dtype)
    pooled = pooled.to(device, unet_dtype)
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=unet_dtype, device=device).expand(embeds.shape[0], -1)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids}


def denoise(parts: SDXLParts, scheduler, latents: torch.Tensor, embeds: torch.Tensor, added_cond: dict, use_cfg: bool,
            guidance, unet_dtype: torch.dtype, progress=None) -> torch.Tensor:
    """The sampling loop, shared by single-adapter and mixed-adapter passes. `guidance` is a float or a per-image
    [n, 1, 1, 1] tensor; under CFG the U-Net rows are [unconditional; conditional]."""
    device = parts.device
    total = len(scheduler.timesteps)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, timestep).to(unet_dtype)
        timesteps = timestep.to(device).expand(model_input.shape[0])
        prediction = parts.unet(model_input, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added_cond).sample.float()
        if use_cfg:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(prediction, timestep, latents).prev_sample
        if progress is not None:
            progress(index + 1, total)
    return latents


def decode_latents(parts: SDXLParts, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to [n, 3, H, W] uint8 on the CPU (rounded, as a saved PNG holds them)."""
    vae = parts.vae
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    decoded = vae.decode(latents.to(_module_dtype(vae))).sample.float()
    return ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class Generator:
    """One resident base that generates with zero or one adapter, switched in place (never reloaded).

    `use(adapter)` applies an adapter (or removes the active one for `None`); it is a no-op when that
    adapter object is already active. A base-fingerprint mismatch is a `GenerationError` on `adapter`.
    """

    def __init__(self, parts: SDXLParts, host: AdapterHost | None = None):
        self.parts = parts
        self.host = host or AdapterHost(parts)

    @property
    def active(self) -> Adapter | None:
        return self.host.active

    def use(self, adapter: Adapter | None) -> float:
        """Make `adapter` the active one; return the seconds the switch took (0 when nothing changed)."""
        if adapter is self.host.active:
            return 0.0
        started = time.perf_counter()
        if adapter is None:
            self.host.remove()
        else:
            try:
                self.host.apply(adapter)
            except AdapterError as err:
                raise GenerationError("adapter", str(err)) from None
        if self.parts.device.type == "cuda":
            torch.cuda.synchronize(self.parts.device)
        return time.perf_counter() - started

    def __call__(self, request: GenerationRequest | dict, *, progress: ProgressCallback | None = None) -> GenerationResult:
        """Generate with the active adapter (or the bare base when none is active)."""
        request = parse_request(request, self.parts)
        return generate(self.parts, request, token_ids=self.host.token_ids, progress=progress)


__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "ProgressCallback",
    "PromptError",
    "decode_latents",
    "generate",
    "initial_latents",
    "make_scheduler",
    "parse_request",
    "size_range",
]
