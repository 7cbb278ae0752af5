"""Cross-attention recording for SCaG (METHOD.md, "Recording the maps").

`RecordingAttnProcessor` is a diffusers attention processor. On watched attn2 layers (at most
`max_tokens` query positions) it computes softmax(QKᵀ/√d) explicitly, keeps the head-averaged map when
the recorder is recording, and applies it to V; every other layer uses SDPA.

Under gradient checkpointing (`use_reentrant=False`) the processor runs a second time inside backward.
The recorder records only inside `recorder.recording()`, which the trainer opens around the forward pass
and closes before the loss's `backward()`, so the recompute adds nothing. The maps recorded in the
forward pass stay attached to the autograd graph; non-reentrant checkpointing recomputes what their
backward needs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from causalt2i.models import attn2_modules


class AttentionRecorder:
    def __init__(self, max_tokens: int = 32 * 32):
        self.max_tokens = max_tokens
        self.maps: list[torch.Tensor] = []  # each [B, h*w, 77], head-averaged
        self._active = False
        self._latent_hw: tuple[int, int] | None = None

    @contextlib.contextmanager
    def recording(self, latent_hw: tuple[int, int]) -> Iterator["AttentionRecorder"]:
        """Record the watched layers' maps during one forward pass of a latent of size `latent_hw`."""
        self.maps = []
        self._latent_hw = latent_hw
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def watches(self, query_tokens: int) -> bool:
        return query_tokens <= self.max_tokens

    def record(self, probs: torch.Tensor) -> None:
        if self._active:
            self.maps.append(probs)

    def aggregate(self, size: int | None = None) -> torch.Tensor:
        """Average the recorded maps over layers at one spatial size: [B, 77, size_h, size_w].

        Each layer's map is resized (bilinear) to the largest recorded resolution, or to `size` along the
        longer side when given.
        """
        if not self.maps or self._latent_hw is None:
            raise RuntimeError("no cross-attention maps were recorded; was the forward pass inside recording()?")
        latent_h, latent_w = self._latent_hw
        grids = []
        for probs in self.maps:
            batch, tokens, text_len = probs.shape
            factor = math.sqrt(latent_h * latent_w / tokens)
            h, w = round(latent_h / factor), round(latent_w / factor)
            grids.append(probs.transpose(1, 2).reshape(batch, text_len, h, w))
        if size is None:
            target = max((g.shape[-2], g.shape[-1]) for g in grids)
        else:
            scale = size / max(latent_h, latent_w)
            target = (max(1, round(latent_h * scale)), max(1, round(latent_w * scale)))
        resized = [g if g.shape[-2:] == target else F.interpolate(g.float(), size=target, mode="bilinear", align_corners=False) for g in grids]
        return torch.stack([r.float() for r in resized]).mean(0)


class RecordingAttnProcessor:
    """Explicit-softmax cross-attention that reports its head-averaged map to an `AttentionRecorder`."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder
        self._sdpa = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attention_mask is not None or not self.recorder.watches(hidden_states.shape[1]):
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        batch, query_len, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        scores = (query @ key.transpose(-1, -2)) * attn.scale
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        self.recorder.record(probs.mean(dim=1))
        hidden_states = (probs @ value).transpose(1, 2).reshape(batch, query_len, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_recorder(unet: torch.nn.Module, max_tokens: int = 32 * 32) -> AttentionRecorder:
    """Put a recording processor on every attn2 and SDPA on every other attention layer."""
    recorder = AttentionRecorder(max_tokens=max_tokens)
    recording = RecordingAttnProcessor(recorder)
    cross = set(attn2_modules(unet))
    processors = {}
    for name in unet.attn_processors:
        module_name = name.removesuffix(".processor")
        processors[name] = recording if module_name in cross else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return recorder


def uninstall_recorder(unet: torch.nn.Module) -> None:
    unet.set_attn_processor(AttnProcessor2_0())
