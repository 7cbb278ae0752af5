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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDXLParts":
        for name, module in self.modules().items():
            # The VAE stays in fp32: SDXL's VAE overflows in fp16 (METHOD.md: fp32 or the fp16-fix VAE).
            module.to(device=device, dtype=None if name == "vae" else dtype)
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
        return CLIPVisionModelWithProjection.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the image encoder from {source!r}: {err}") from err


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
    and real SDXL uses CLIP ViT-L/14. `vae` overrides the VAE (e.g. 'madebyollin/sdxl-vae-fp16-fix').
    """
    if base_model == TINY:
        parts = _build_tiny(seed, image_encoder)
    else:
        parts = _load_pretrained(base_model, image_encoder, vae)
    for module in parts.modules().values():
        module.requires_grad_(False)
        module.eval()
    # Fingerprint the weights as loaded, before any cast: a base served in fp16 must still accept the
    # adapters tuned on it in fp32 (a fingerprint of the fp16 copy would refuse every one of them).
    parts.base_fingerprint()
    if device is not None or dtype is not None:
        parts.to(device or "cpu", dtype)
    return parts


def _build_tiny(seed: int, image_encoder: str | None) -> SDXLParts:
    tokenizer = tiny.make_tiny_clip_tokenizer()
    tokenizer_2 = tiny.make_tiny_clip_tokenizer()
    te1, te2 = tiny.build_tiny_text_encoders(len(tokenizer), seed)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**tiny.tiny_unet_config())
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**tiny.tiny_vae_config())
    return SDXLParts(
        base_model=TINY,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=te1,
        text_encoder_2=te2,
        unet=unet,
        vae=vae,
        noise_scheduler=sdxl_noise_scheduler(),
        image_encoder=_load_image_encoder(image_encoder or TINY, seed),
        default_resolution=tiny.TINY_RESOLUTION,
    )


def sdxl_noise_scheduler() -> DDPMScheduler:
    """SDXL's training noise schedule (scaled_linear 0.00085..0.012 over 1000 steps, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _load_pretrained(source: str, image_encoder: str | None, vae_source: str | None) -> SDXLParts:
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
        raise ModelLoadError(f"{source} is a folder but not a diffusers SDXL folder (no model_index.json or unet/)")
    kwargs = {"local_files_only": _offline()}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
        te1 = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        te2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        if vae_source:
            vae = AutoencoderKL.from_pretrained(vae_source, **kwargs)
        else:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
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
