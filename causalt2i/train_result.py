"""What a training run returns, in a module of its own so that the processes that only hand it on (the attempt task,
the search driver, the control plane) need not import torch, diffusers and peft with the trainer (~8 s on a 2-core
machine, BENCHMARKS "time to first step")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    adapter_dir: Path | None
    step: int
    total_steps: int
    stopped_early: bool
    stop_reason: str | None = None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
