"""The total objective (paper Eq. 13): L = L_cdm + L_attn + L_cst (+ λ_text · L_text, off by default).

λ_attn and α are applied inside their terms; this module only sums and reports them. `cst_ratio` is L_cst
without α (what `alpha: auto` calibrates on); it is reported, never added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    cdm: torch.Tensor
    attn: torch.Tensor
    cst: torch.Tensor
    cst_ratio: torch.Tensor | None = None
    text: torch.Tensor | None = None
    lambda_text: float = 0.0

    def total(self) -> torch.Tensor:
        loss = self.cdm + self.attn + self.cst
        if self.text is not None and self.lambda_text > 0:
            loss = loss + self.lambda_text * self.text
        return loss

    def names(self) -> list[str]:
        """The reported terms, in the order of `stacked()`: total first."""
        return ["loss", "cdm", "attn", "cst"] + (["cst_ratio"] if self.cst_ratio is not None else []) + (["text"] if self.text is not None else [])

    def stacked(self) -> torch.Tensor:
        """Every reported value in one detached fp32 tensor on the loss's device: one host copy reads them all."""
        values = [self.total(), self.cdm, self.attn, self.cst]
        values += [v for v in (self.cst_ratio, self.text) if v is not None]
        return torch.stack([v.detach().float().reshape(()) for v in values])

    def as_floats(self) -> dict[str, float]:
        """The reported values as floats (a host sync; the trainer batches these instead)."""
        return dict(zip(self.names(), self.stacked().tolist()))
