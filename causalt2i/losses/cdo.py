"""CdO: causal denoising objective (paper Eq. 12).

L_cdm = ‖ε − ε_θ(z_t, t, f_{n+1}^s + f̄_{n+1})‖², with f̄_{n+1} broadcast over all 77 token positions.
The pooled embedding and SDXL's time_ids come from P_{n+1} and the canvas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def intervened_condition(text_embeds: torch.Tensor, f_bar: torch.Tensor) -> torch.Tensor:
    """f^s_{n+1} + f̄_{n+1}: [B, 77, D] + [B, D] broadcast over tokens."""
    return text_embeds + f_bar.unsqueeze(1).to(text_embeds.dtype)


def denoising_loss(noise: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ‖² as a mean over elements (Eq. 12; also the optional λ_text term)."""
    return F.mse_loss(prediction.float(), noise.float(), reduction="mean")
