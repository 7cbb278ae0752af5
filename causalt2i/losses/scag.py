"""SCaG: soft cross-attention guidance (paper Eqs. 10–11; METHOD.md "SCaG").

A_i is the cross-attention map of P_i's identity tokens (identifier + class word, as they appear in
P_{n+1}), min-max normalised, resized to E_I's input, repeated to 3 channels; Atten_i = E_I(A_i).
It is compared with the retained visual embedding r_i = M_i ⊙ f^m in CLIP image space (the paper writes
f_i, which lives in text space; see METHOD.md):

    L_attn = λ_attn Σ_{i=1}^{n} mean_k((r_i[k] − Atten_i[k])² · γ̃_i[k])

with γ_i = sigmoid(β_i) and, by default, γ̃_i = d_I · γ_i / Σ_k γ_i[k] so the weights shift between
channels but cannot all go to 0 (`gamma: raw` keeps the paper's γ_i).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

EPS = 1e-6


def identity_token_maps(attention: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Each subject's mean map over its identity tokens: attention [B, 77, h, w] → [B, n, h, w]."""
    return torch.stack([attention[:, pos].mean(1) for pos in positions], dim=1)


def identity_maps(attention: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """A_i before E_I: `identity_token_maps` min-max normalised to [0, 1] per subject.

    attention: [B, 77, h, w] (recorded, layer-averaged); positions: token positions per subject.
    Returns [B, n, h, w].
    """
    return min_max(identity_token_maps(attention, positions))


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each [h, w] map of [B, n, h, w] scaled to [0, 1]."""
    flat = maps.flatten(2)
    low = flat.min(-1, keepdim=True).values
    high = flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low + EPS)).view_as(maps)


def attention_embeddings(maps: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Atten_i = E_I(A_i): maps [B, n, h, w] in [0,1] → [B, n, d_I]. `encode` takes [N,3,h,w] in [0,1]."""
    batch, n, h, w = maps.shape
    three = maps.reshape(batch * n, 1, h, w).expand(-1, 3, -1, -1)
    return encode(three).view(batch, n, -1)


class ChannelWeights(nn.Module):
    """γ_i = sigmoid(β_i), β_i ∈ R^{d_I} initialised to 0, for i = 1..n."""

    def __init__(self, n_subjects: int, image_dim: int):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(n_subjects, image_dim))

    def weights(self, form: Literal["normalized", "raw"] = "normalized") -> torch.Tensor:
        gamma = torch.sigmoid(self.beta)
        if form == "raw":
            return gamma
        if form == "normalized":
            return gamma.shape[-1] * gamma / gamma.sum(-1, keepdim=True)
        raise ValueError(f"unknown gamma form {form!r}")

    def entropy(self) -> torch.Tensor:
        """Entropy of each γ̃_i as a distribution over channels, [n] (log d_I when uniform)."""
        p = torch.sigmoid(self.beta)
        p = p / p.sum(-1, keepdim=True)
        return -(p * p.clamp_min(1e-12).log()).sum(-1)


def attn_loss(retained: torch.Tensor, atten: torch.Tensor, channel_weights: torch.Tensor, *, lambda_attn: float) -> torch.Tensor:
    """L_attn of Eq. 11: retained r_i [B, n, d_I], atten Atten_i [B, n, d_I], weights γ̃ [n, d_I]."""
    per_subject = ((retained - atten) ** 2 * channel_weights.unsqueeze(0)).mean(-1)
    return lambda_attn * per_subject.sum(1).mean()
