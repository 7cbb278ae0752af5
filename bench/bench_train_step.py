"""Training-step benchmark on the faithful tiny preset (CPU): steps/s, and a CausalT2I step over a plain step.

The preset is the official SDXL configs with only sizes shrunk (`causalt2i/configs/tiny`): three U-Net
levels with 32 norm groups, 11 attn2 layers, CLIP vocabularies of 49408, quick_gelu/gelu encoders.
Both steps run on the same model, interleaved in one process so the machine's state affects both alike.
The plain step is ‖target − ε_θ(z_t, t, f^s_{n+1})‖² with SDPA everywhere (no recording, no E_I on the
maps, no L_cst): what a DreamBooth-style fine-tune of the same parameters costs. Target: ≤ 1.25×.

    .venv/bin/python bench/bench_train_step.py [--steps 20] [--threads 1] [--dtype-policy fp32|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers.models.attention_processor import AttnProcessor2_0

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.models import attn2_modules
from causalt2i.spec import parse_spec
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
    noise = torch.randn(example.latents.shape, generator=trainer.noise_generator, device=trainer.device)
    t = torch.randint(0, 1000, (1,), generator=trainer.noise_generator, device=trainer.device)
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
    parser.add_argument("--dtype-policy", choices=("fp32", "bf16"), default="fp32", help="bf16 on a CPU measures the policy, not speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_spec(Path(tmp) / "s", resolution=args.resolution, steps=1000, n_subjects=2, gpus_per_worker=0)
        data = yaml.safe_load(path.read_text())
        data["train"]["dtype_policy"] = args.dtype_policy
        spec = parse_spec(data, base_dir=path.parent)
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
        unet = trainer.model.parts.unet
        shape = f"U-Net {sum(p.numel() for p in unet.parameters()):,} params, {len(attn2_modules(unet))} attn2 layers"
    c, p = statistics.median(causal), statistics.median(plain)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"faithful tiny preset ({shape}), {args.resolution}px, 2 subjects, full attn2, {args.dtype_policy}, {args.steps} steps of each kind (median)")
    print(f"| step | s/step | steps/s |\n|---|---|---|\n| CausalT2I | {c:.4f} | {1 / c:.2f} |\n| plain denoising | {p:.4f} | {1 / p:.2f} |")
    print(f"ratio CausalT2I / plain: {c / p:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()
