"""E_I: the frozen CLIP vision encoder with differentiable, in-graph preprocessing (METHOD.md, SaCD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from causalt2i.models import CLIP_MEAN, CLIP_STD, SDXLParts

IMAGE_PAD_VALUE = 0.5  # canvases: mid-grey
MAP_PAD_VALUE = 0.0  # SCaG's attention maps: padding is "no attention", not mid-level attention (METHOD.md)


def clip_preprocess(images: torch.Tensor, size: int, pad_value: float = IMAGE_PAD_VALUE) -> torch.Tensor:
    """[B,3,H,W] in [0,1] → padded to square (centred, with `pad_value`), resized to `size`, CLIP-normalised.

    Every op is differentiable, so gradients reach whatever produced `images` (SCaG's attention maps).
    """
    _, _, height, width = images.shape
    side = max(height, width)
    pad_h, pad_w = side - height, side - width
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=pad_value)
    if side != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=side > size)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def encode_images(parts: SDXLParts, images: torch.Tensor, *, pad_value: float = IMAGE_PAD_VALUE) -> torch.Tensor:
    """f = E_I(x): the projected pooled CLIP embedding, [B, d_I]. `images` are [B,3,H,W] in [0,1]."""
    encoder = parts.image_encoder
    dtype = next(encoder.parameters()).dtype
    pixels = clip_preprocess(images.float(), parts.image_encoder_size, pad_value).to(dtype)
    return encoder(pixel_values=pixels).image_embeds
