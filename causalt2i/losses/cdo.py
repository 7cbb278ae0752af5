"""CdO: causal denoising objective (paper Eq. 12).

L_cdm = ‖ε − ε_θ(z_t, t, f_{n+1}^s + f̄_{n+1})‖², with f̄_{n+1} broadcast over all 77 token positions.
The pooled embedding and SDXL's time_ids come from P_{n+1} and the canvas.

The target follows the base's scheduler (METHOD.md, "Prediction type"): ε for `epsilon`, the velocity
v = α_t ε − σ_t z for `v_prediction` (`scheduler.get_velocity`). A v-prediction base trained on ε would
be sampled as v and silently produce noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What ε_θ must predict: ε (`epsilon`) or `scheduler.get_velocity(z, ε, t)` (`v_prediction`)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; supported: {', '.join(SUPPORTED_PREDICTION_TYPES)}")


def intervened_condition(text_embeds: torch.Tensor, f_bar: torch.Tensor) -> torch.Tensor:
    """f^s_{n+1} + f̄_{n+1}: [B, 77, D] + [B, D] broadcast over tokens."""
    return text_embeds + f_bar.unsqueeze(1).to(text_embeds.dtype)


def denoising_loss(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """‖target − ε_θ‖² as a mean over elements (Eq. 12; also the optional λ_text term)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
