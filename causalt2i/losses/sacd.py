"""SaCD: subject-aware causal disentanglement (paper Eqs. 7–9; METHOD.md "SaCD").

Masks M_i = sigmoid(m_i) gate the channels of the image embedding f^m. One intervention network, shared
across i, maps the retained part to f_i and the removed part to f̄_i (Eqs. 7–8):

    f_i = W_out(M_i ⊙ f^m + MLP(M_i ⊙ f^m)),    f̄_i = the same with 1 − M_i.

L_cst (Eq. 9) = α Σ_{i=1}^{n+1} c(f̄_i, f_i^s) / c(f_i, f_i^s), with c(f, f^s) = cos(f, mean_t f^s[t]) over
P_i's valid tokens. `shifted` (default) uses (1 + c̄ + ε) / (1 + c + ε), which stays positive and bounded;
`raw` is the paper's ratio with the denominator clamped to ≥ ε.

Gradient routing (`cst_grad`): under `masks` the network's parameters are detached inside L_cst, so its
gradient reaches the masks (through the network) and f^s but not the network's weights; the network is
trained by L_cdm through f̄_{n+1}. `all` is the paper's joint training.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

EPS = 1e-6


class InterventionNetwork(nn.Module):
    """f = W_out(x + MLP(x)), MLP: d_I → d_I (Linear, GELU, Linear), W_out: d_I → d_text (Eqs. 7–8)."""

    def __init__(self, image_dim: int, text_dim: int, w_out_init_scale: float = 1e-3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, image_dim))
        self.w_out = nn.Linear(image_dim, text_dim)
        # A small W_out makes f̄ start near 0, so CdO starts as plain denoising (cosine is scale-invariant).
        with torch.no_grad():
            self.w_out.weight.mul_(w_out_init_scale)
            self.w_out.bias.mul_(w_out_init_scale)

    def forward(self, gated: torch.Tensor) -> torch.Tensor:
        return self.w_out(gated + self.mlp(gated))


class SaCD(nn.Module):
    """The masks m_1..m_{n+1} and the shared intervention network."""

    def __init__(self, n_subjects: int, image_dim: int, text_dim: int):
        super().__init__()
        self.n_subjects = n_subjects
        self.mask_logits = nn.Parameter(torch.zeros(n_subjects + 1, image_dim))
        self.net = InterventionNetwork(image_dim, text_dim)

    def masks(self) -> torch.Tensor:
        """M_i = sigmoid(m_i), [n+1, d_I]; row n is M_{n+1}."""
        return torch.sigmoid(self.mask_logits)

    def intervene(self, image_embeds: torch.Tensor, *, detach_net: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """f_i and f̄_i for every i: [B, n+1, d_text] each, from f^m [B, d_I]."""
        masks = self.masks()
        retained = masks.unsqueeze(0) * image_embeds.unsqueeze(1)
        removed = (1 - masks).unsqueeze(0) * image_embeds.unsqueeze(1)
        both = torch.cat([retained, removed], dim=1)
        if detach_net:
            frozen = {name: p.detach() for name, p in self.net.named_parameters()}
            out = functional_call(self.net, frozen, (both,))
        else:
            out = self.net(both)
        return out[:, : self.n_subjects + 1], out[:, self.n_subjects + 1 :]


def mean_text_embedding(text_embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean_t f^s[t] over P_i's valid positions (BOS..EOS): [P, 77, D] → [P, D]."""
    weights = valid.to(text_embeds.dtype).unsqueeze(-1)
    return (text_embeds * weights).sum(1) / weights.sum(1).clamp_min(1)


def cst_loss(
    sacd: SaCD,
    image_embeds: torch.Tensor,
    text_means: torch.Tensor,
    *,
    alpha: float,
    form: Literal["shifted", "raw"] = "shifted",
    grad: Literal["masks", "all"] = "masks",
) -> torch.Tensor:
    """L_cst of Eq. 9, averaged over the batch.

    image_embeds: f^m [B, d_I]; text_means: mean_t f_i^s for i = 1..n+1, [n+1, d_text].
    """
    f, f_bar = sacd.intervene(image_embeds, detach_net=grad == "masks")
    target = text_means.unsqueeze(0).to(f.dtype)
    cos_kept = F.cosine_similarity(f, target, dim=-1)
    cos_removed = F.cosine_similarity(f_bar, target, dim=-1)
    if form == "shifted":
        ratio = (1 + cos_removed + EPS) / (1 + cos_kept + EPS)
    elif form == "raw":
        ratio = cos_removed / cos_kept.clamp_min(EPS)
    else:
        raise ValueError(f"unknown cst_form {form!r}")
    return alpha * ratio.sum(dim=1).mean()
