"""Trainer callbacks: progress (a bar on a TTY, plain lines otherwise) and a JSON-lines metrics log."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO


@dataclass
class StepInfo:
    step: int
    total_steps: int
    loss: float
    terms: dict[str, float]
    seconds_per_step: float
    eta_seconds: float


class TrainerCallback(Protocol):
    """All methods are optional; the trainer calls those a callback defines."""

    def on_step(self, info: StepInfo) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_preview(self, step: int, folder: Path) -> None: ...
    def on_diagnostics(self, step: int, diagnostics: dict) -> None: ...
    def should_stop(self) -> bool: ...


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressCallback:
    """A tqdm bar when `stream` is a terminal; one line every `every` steps otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None, every: int = 10):
        self.stream = stream or sys.stderr
        self.every = every
        self.total = total_steps
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)

    def on_step(self, info: StepInfo) -> None:
        terms = " ".join(f"{k}={v:.4g}" for k, v in info.terms.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss={info.loss:.4g} {terms}")
        elif info.step % self.every == 0 or info.step == info.total_steps:
            print(f"step {info.step}/{info.total_steps} loss={info.loss:.4g} {terms} {info.seconds_per_step:.3f}s/step eta {_fmt_eta(info.eta_seconds)}", file=self.stream, flush=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._write(f"checkpoint step {step}: {path}")

    def on_preview(self, step: int, folder: Path) -> None:
        self._write(f"preview step {step}: {folder}")

    def on_diagnostics(self, step: int, diagnostics: dict) -> None:
        """SaCD/SCaG diagnostics (`CausalT2I.diagnostics`): per subject cos(f_i, f_i^s) vs cos(f̄_i, f_i^s),
        each term's share of the mask-logit gradient, mask spread, γ̃ entropy, α. A cos margin near 0 or an
        L_cst share near 0 means SaCD is not doing anything."""
        self._write(f"diagnostics step {step}: " + " ".join(f"{k}={v}" for k, v in _flatten(diagnostics).items()))

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonlMetricsCallback:
    """Appends one JSON object per step to `path` (loss, terms, timing) for plots and dashboards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_step(self, info: StepInfo) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": info.step, "loss": info.loss, **info.terms, "s_per_step": info.seconds_per_step}) + "\n")
