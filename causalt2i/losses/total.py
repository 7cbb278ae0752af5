"""The total objective (paper Eq. 13): L = L_cdm + L_attn + L_cst (+ λ_text · L_text, off by default).

λ_attn and α are applied inside their terms; this module only sums and reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    cdm: torch.Tensor
    attn: torch.Tensor
    cst: torch.Tensor
    text: torch.Tensor | None = None
    lambda_text: float = 0.0

    def total(self) -> torch.Tensor:
        loss = self.cdm + self.attn + self.cst
        if self.text is not None and self.lambda_text > 0:
            loss = loss + self.lambda_text * self.text
        return loss

    def as_floats(self) -> dict[str, float]:
        values = {"cdm": float(self.cdm.detach()), "attn": float(self.attn.detach()), "cst": float(self.cst.detach())}
        if self.text is not None:
            values["text"] = float(self.text.detach())
        return values
