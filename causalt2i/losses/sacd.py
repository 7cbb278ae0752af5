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
    """f = g · W_out(x + MLP(x)), MLP: d_I → d_I (Linear, GELU, Linear), W_out: d_I → d_text (Eqs. 7–8).

    `g` is a learnable output gain that starts at `w_out_init_scale` (1e-3), so f̄ starts near 0 and CdO
    starts as plain denoising: at initialisation this is the same function as METHOD.md's "W_out at its
    default init × 1e-3". It is a different parametrisation on purpose. Adam moves every weight by about
    its learning rate per step whatever its scale; a W_out of scale 1e-4 is therefore overwritten within
    a few steps by L_cdm's low-rank updates, after which every f_i and f̄_i points the same way and
    c(f_i, f_i^s) = c(f̄_i, f_i^s) whatever the masks (measured on the tiny preset: L_cst stayed at its
    initial value for 300 steps). With the scale in `g`, W_out keeps its full-rank default init and L_cst's
    gradient reaches the masks (METHOD.md, "Measured on the tiny preset").
    """

    def __init__(self, image_dim: int, text_dim: int, w_out_init_scale: float = 1e-3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, image_dim))
        self.w_out = nn.Linear(image_dim, text_dim)
        # Shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.gain = nn.Parameter(torch.full((1,), float(w_out_init_scale)))

    def forward(self, gated: torch.Tensor) -> torch.Tensor:
        return self.gain * self.w_out(gated + self.mlp(gated))


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


def cst_cosines(sacd: SaCD, image_embeds: torch.Tensor, text_means: torch.Tensor, *, detach_net: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """c(f_i, f_i^s) and c(f̄_i, f_i^s) for i = 1..n+1: [B, n+1] each (Eq. 9's numerator and denominator)."""
    f, f_bar = sacd.intervene(image_embeds, detach_net=detach_net)
    target = text_means.unsqueeze(0).to(f.dtype)
    return F.cosine_similarity(f, target, dim=-1), F.cosine_similarity(f_bar, target, dim=-1)


def cst_ratio(
    sacd: SaCD,
    image_embeds: torch.Tensor,
    text_means: torch.Tensor,
    *,
    form: Literal["shifted", "raw"] = "shifted",
    grad: Literal["masks", "all"] = "masks",
) -> torch.Tensor:
    """Σ_{i=1}^{n+1} c(f̄_i, f_i^s) / c(f_i, f_i^s) of Eq. 9 without α, averaged over the batch.

    image_embeds: f^m [B, d_I]; text_means: mean_t f_i^s for i = 1..n+1, [n+1, d_text].
    """
    cos_kept, cos_removed = cst_cosines(sacd, image_embeds, text_means, detach_net=grad == "masks")
    if form == "shifted":
        ratio = (1 + cos_removed + EPS) / (1 + cos_kept + EPS)
    elif form == "raw":
        ratio = cos_removed / cos_kept.clamp_min(EPS)
    else:
        raise ValueError(f"unknown cst_form {form!r}")
    return ratio.sum(dim=1).mean()


def cst_loss(
    sacd: SaCD,
    image_embeds: torch.Tensor,
    text_means: torch.Tensor,
    *,
    alpha: float,
    form: Literal["shifted", "raw"] = "shifted",
    grad: Literal["masks", "all"] = "masks",
) -> torch.Tensor:
    """L_cst of Eq. 9: α · `cst_ratio`."""
    return alpha * cst_ratio(sacd, image_embeds, text_means, form=form, grad=grad)
