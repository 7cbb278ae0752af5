"""Training-step benchmark on the tiny preset (CPU): steps/s, and a CausalT2I step over a plain denoising step.

Both steps run on the same model, interleaved in one process so the machine's state affects both alike.
The plain step is ‖ε − ε_θ(z_t, t, f^s_{n+1})‖² with SDPA everywhere (no recording, no E_I on the maps,
no L_cst): what a DreamBooth-style fine-tune of the same parameters costs.

    .venv/bin/python bench/bench_train_step.py [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.spec import load_spec
from causalt2i.trainer import Trainer


@contextlib.contextmanager
def sdpa_everywhere(unet):
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def plain_step(trainer: Trainer) -> None:
    example = trainer.examples[0]
    noise = torch.randn(example.latents.shape, generator=trainer.noise_generator)
    t = torch.randint(0, 1000, (1,), generator=trainer.noise_generator)
    with sdpa_everywhere(trainer.model.parts.unet):
        loss = trainer.model.plain_denoising_loss(example, noise, t)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write_synthetic_spec(Path(tmp) / "s", resolution=args.resolution, steps=1000, n_subjects=2, gpus_per_worker=0))
        trainer = Trainer(spec, Path(tmp) / "run", device="cpu")
        for _ in range(3):  # warm-up: allocator, first-call dispatch
            trainer.train_step()
            plain_step(trainer)
        causal, plain = [], []
        for _ in range(args.steps):
            started = time.perf_counter()
            trainer.train_step()
            causal.append(time.perf_counter() - started)
            started = time.perf_counter()
            plain_step(trainer)
            plain.append(time.perf_counter() - started)
    c, p = statistics.median(causal), statistics.median(plain)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tiny preset, {args.resolution}px, 2 subjects, full attn2, {args.steps} steps of each kind (median)")
    print(f"| step | s/step | steps/s |\n|---|---|---|\n| CausalT2I | {c:.4f} | {1 / c:.2f} |\n| plain denoising | {p:.4f} | {1 / p:.2f} |")
    print(f"ratio CausalT2I / plain: {c / p:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
