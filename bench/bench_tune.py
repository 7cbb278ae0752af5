"""Ray Train + DeepSpeed over the direct single-process trainer, tiny preset, same steps, on CPU.

Reports the per-step ratio (steps timed inside the worker, after its set-up) and the fixed start-up of
a Ray Train run (fit() wall time minus its steps) separately. Both runs use 1 torch thread.

    .venv/bin/python bench/bench_tune.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.spec import load_spec
from causalt2i.trainer import Trainer


def direct_seconds_per_step(spec, steps: int) -> float:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, Path(tmp) / "run", device="cpu")
        trainer.train_step()  # warm-up, as the worker's first step is excluded below too
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def ray_train_seconds(spec, steps: int) -> tuple[float, float]:
    import ray

    from tune.runner import build_torch_trainer

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_torch_trainer(spec, name="bench", storage=str(Path(tmp) / "store"), use_gpu=False)
            started = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    per_step = float(result.metrics["seconds_per_step"])
    return per_step, wall - per_step * (steps + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write_synthetic_spec(Path(tmp) / "s", steps=args.steps + 1, gpus_per_worker=0))
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"checkpoint_every": args.steps + 1})})
        direct = direct_seconds_per_step(spec, args.steps)
        ray_step, startup = ray_train_seconds(spec, args.steps)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; tiny preset, 64 px, 2 subjects, 1 thread")
    print("| run | s/step |\n|---|---|")
    print(f"| direct Trainer | {direct:.4f} |\n| Ray Train, 1 worker, DeepSpeed ZeRO-2 (gloo) | {ray_step:.4f} |")
    print(f"ratio Ray Train / direct: {ray_step / direct:.2f}x (target <= 1.2x)")
    print(f"Ray Train fixed start-up (fit wall time minus steps): {startup:.1f} s")


if __name__ == "__main__":
    main()
