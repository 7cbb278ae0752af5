"""Cost of training previews on the faithful tiny preset (CPU), at the default interval (every checkpoint).

One run of `--steps` steps with `checkpoint_every` at its default (100) and `preview_every` unset (= every
checkpoint): the seconds inside `Trainer.preview` are timed against the seconds of the whole `fit`, in the same
process, so the machine's state affects both alike. Reported: previews' share of the training time
(preview seconds / (fit seconds − preview seconds)), the seconds per preview and per training step.

    .venv/bin/python bench/bench_previews.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.spec import parse_spec
from causalt2i.trainer import Trainer, prepare_run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subjects", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = write_synthetic_spec(Path(tmp) / "spec", resolution=64, steps=args.steps, n_subjects=args.subjects,
                                         images_per_subject=2, size=64)
        data = yaml.safe_load(spec_path.read_text())
        spec = parse_spec(data, base_dir=spec_path.parent)
        run_dir = Path(tmp) / "run"
        trainer = Trainer(spec, run_dir, device="cpu")
        prepare_run_dir(spec, run_dir, resume=False)
        preview_seconds: list[float] = []
        render = trainer.preview

        def timed_preview():
            started = time.perf_counter()
            folder = render()
            preview_seconds.append(time.perf_counter() - started)
            return folder

        trainer.preview = timed_preview
        started = time.perf_counter()
        trainer.fit()
        fit_seconds = time.perf_counter() - started
    spent = sum(preview_seconds)
    training = fit_seconds - spent
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={args.threads}".strip(),
        "steps": args.steps, "checkpoint_every": spec.train.checkpoint_every, "preview_interval": spec.preview_interval,
        "prompts_per_preview": len(spec.preview_prompts()), "previews": len(preview_seconds),
        "seconds_per_preview": round(spent / max(1, len(preview_seconds)), 3),
        "seconds_per_step": round(training / args.steps, 4),
        "preview_share_of_training": round(spent / training, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
