"""Loading the SDXL parts CausalT2I needs: two tokenizers, two text encoders, U-Net, VAE, scheduler, E_I.

`load_sdxl("tiny")` builds the offline preset (see `tiny.py`); any other value is a hub id or a local
diffusers folder of SDXL (`model_index.json` with `tokenizer/`, `text_encoder/`, `text_encoder_2/`,
`unet/`, `vae/`, `scheduler/` subfolders). E_I defaults to CLIP ViT-L/14 with its projection.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from causalt2i import tiny

TINY = "tiny"
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ATTN2_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class ModelLoadError(RuntimeError):
    """The base model or the image encoder could not be loaded from what was configured."""


@dataclass
class SDXLParts:
    """The loaded components. `base_model` is what they were loaded from ('tiny', a hub id or a folder)."""

    base_model: str
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    image_encoder: CLIPVisionModelWithProjection
    default_resolution: int = 1024
    _fingerprint: str | None = field(default=None, repr=False)
    # fp32 attn2 weight = hi + lo, hi being the live 16-bit tensor: `lo` is what the cast to a serving dtype
    # rounded away, kept (in that dtype, on the U-Net's device) so a full adapter's base + ΔW is rounded once.
    attn2_residual: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def text_dim(self) -> int:
        """Width of E_T(P): te1 and te2 penultimate hidden states concatenated (2048 on SDXL)."""
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def image_dim(self) -> int:
        """d_I: E_I's projection width (768 for ViT-L/14)."""
        return self.image_encoder.config.projection_dim

    @property
    def image_encoder_size(self) -> int:
        return self.image_encoder.config.vision_config.image_size if hasattr(self.image_encoder.config, "vision_config") else self.image_encoder.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "unet": self.unet,
            "vae": self.vae,
            "image_encoder": self.image_encoder,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, *, keep_attn2_residual: bool = False) -> "SDXLParts":
        """Move every module to `device`; with `dtype`, hold the frozen modules in it (the dtype policy).

        The VAE keeps fp32 unless its config says `force_upcast: false` (the fp16-fix VAE): SDXL's own
        VAE overflows in half precision (METHOD.md, "dtype policy"). The base fingerprint is taken first,
        on the weights as loaded, so it does not depend on the policy a process runs under.

        `keep_attn2_residual`: when this cast lowers the U-Net's precision, keep `attn2_residual` (one more
        16-bit copy of the attn2 tensors) so `AdapterHost` can add a full adapter's ΔW to the fp32 base and
        round once (issue 14's precision bound); serving asks for it, training does not need it.
        """
        if dtype is not None:
            self.base_fingerprint()
            lowers = next(self.unet.parameters()).dtype == torch.float32 and dtype != torch.float32
            if lowers and keep_attn2_residual:
                # Computed before the cast, tensor by tensor, so no full fp32 copy is held anywhere.
                self.attn2_residual = {k: (v - v.to(dtype).float()).to(device=device, dtype=dtype)
                                       for k, v in attn2_state(self.unet).items()}
            elif next(self.unet.parameters()).dtype != dtype:
                self.attn2_residual = None  # a residual belongs to the cast that made it
        elif self.attn2_residual is not None:
            self.attn2_residual = {k: v.to(device) for k, v in self.attn2_residual.items()}
        for name, module in self.modules().items():
            target = vae_dtype(self.vae, dtype) if name == "vae" else dtype
            # Only a real cast passes a dtype: diffusers warns on any `.to(dtype=...)`.
            if target is None or next(module.parameters()).dtype == target:
                module.to(device=device)
            else:
                module.to(device=device, dtype=target)
        return self

    def base_fingerprint(self) -> str:
        """sha256 over the base attn2 projection tensors (name, dtype, shape, bytes), in name order.

        An adapter records it, and applying an adapter to a different base is refused. It must be taken
        before any adapter is applied, and before a cast to a serving dtype; `load_sdxl` takes it and it
        is cached for those reasons.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in attn2_state(self.unet).items():
                cpu = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}|{cpu.dtype}|{tuple(cpu.shape)}".encode())
                digest.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.dtype == torch.bfloat16 else cpu.numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def resolve_dtype(policy: str, device: torch.device | str) -> torch.dtype:
    """The frozen modules' dtype under a `dtype_policy`: bf16, fp32, or `auto` = bf16 on CUDA, else fp32."""
    if policy == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[policy]


def vae_dtype(vae: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the VAE is held in under a policy of `dtype`: fp32 unless the VAE is safe in half precision."""
    if dtype is None or getattr(vae.config, "force_upcast", True):
        return None if dtype is None else torch.float32
    return dtype


def attn2_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every cross-attention (`attn2`) module of the U-Net, by its diffusers name."""
    return {name: module for name, module in unet.named_modules() if name.endswith(".attn2")}


def attn2_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable attn2 projection tensors (weights and biases), by diffusers parameter name."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in attn2_modules(unet).items():
        for projection in ATTN2_PROJECTIONS:
            linear = module.get_submodule(projection)
            # Under LoRA training peft wraps the projection; the base tensors are what attn2 means here.
            linear = getattr(linear, "base_layer", linear)
            for param_name, param in linear.named_parameters(recurse=False):
                state[f"{module_name}.{projection}.{param_name}"] = param
    return dict(sorted(state.items()))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") == "1"


def _load_image_encoder(source: str | None, seed: int) -> CLIPVisionModelWithProjection:
    if source in (None, TINY):
        return tiny.build_tiny_image_encoder(seed)
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, dtype=torch.float32, local_files_only=_offline())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the image encoder from {source!r}: {err}") from err


def _load_vae(source: str) -> AutoencoderKL:
    try:
        return AutoencoderKL.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the VAE from {source!r}: {err}") from err


def load_sdxl(
    base_model: str = TINY,
    *,
    image_encoder: str | None = None,
    vae: str | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SDXLParts:
    """Load SDXL from 'tiny', a hub id or a local diffusers folder.

    `image_encoder` overrides E_I (hub id or folder); by default 'tiny' uses the tiny CLIP vision model
    and real SDXL uses CLIP ViT-L/14. `vae` overrides the VAE (e.g. 'madebyollin/sdxl-vae-fp16-fix', or a
    local folder). `dtype` is the dtype the frozen modules are held in (see `SDXLParts.to`); a cast to a
    16-bit dtype keeps the attn2 residual, since every caller that casts here generates with adapters.
    """
    if base_model == TINY:
        parts = _build_tiny(seed, image_encoder)
        if vae:
            parts.vae = _load_vae(vae)
    else:
        parts = _load_pretrained(base_model, image_encoder, vae)
    for module in parts.modules().values():
        module.requires_grad_(False)
        module.eval()
    # Fingerprint the weights as loaded, before any cast: a base served in fp16 must still accept the
    # adapters tuned on it in fp32 (a fingerprint of the fp16 copy would refuse every one of them).
    parts.base_fingerprint()
    if device is not None or dtype is not None:
        parts.to(device or "cpu", dtype, keep_attn2_residual=True)
    return parts


def _build_tiny(seed: int, image_encoder: str | None) -> SDXLParts:
    built = tiny.build_sdxl_components(tiny.TINY_CONFIGS, tiny.TINY_IMAGE_ENCODER_CONFIGS, seed=seed)
    return SDXLParts(
        base_model=TINY,
        tokenizer=built["tokenizer"],
        tokenizer_2=built["tokenizer_2"],
        text_encoder=built["text_encoder"],
        text_encoder_2=built["text_encoder_2"],
        unet=built["unet"],
        vae=built["vae"],
        noise_scheduler=DDPMScheduler.from_config(built["scheduler_config"]),
        image_encoder=built["image_encoder"] if image_encoder in (None, TINY) else _load_image_encoder(image_encoder, seed),
        default_resolution=tiny.TINY_RESOLUTION,
    )


def _load_pretrained(source: str, image_encoder: str | None, vae_source: str | None) -> SDXLParts:
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
        raise ModelLoadError(f"{source} is a folder but not a diffusers SDXL folder (no model_index.json or unet/)")
    kwargs = {"local_files_only": _offline()}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
        # Loaded in fp32 whatever the configs' `torch_dtype: float16` says: the dtype policy casts later.
        te1 = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **kwargs)
        te2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=torch.float32, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        vae = _load_vae(vae_source) if vae_source else AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load SDXL from {source!r}: {err}") from err
    if unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{source!r} is not SDXL: its U-Net has no text_time conditioning")
    return SDXLParts(
        base_model=source,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=te1,
        text_encoder_2=te2,
        unet=unet,
        vae=vae,
        noise_scheduler=scheduler,
        image_encoder=_load_image_encoder(image_encoder or DEFAULT_IMAGE_ENCODER, 0),
        default_resolution=unet.config.sample_size * 8,
    )
