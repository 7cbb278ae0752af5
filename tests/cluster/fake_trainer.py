"""A stand-in for causalt2i.trainer.train with the same signature and callbacks: fixed-length steps, exact
resume from its own checkpoint file, and a small adapter folder in the real format (safetensors + manifest)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from causalt2i.atomic import atomic_write_bytes, atomic_write_text


@dataclass
class FakeResult:
    adapter_dir: Path | None
    step: int
    total_steps: int
    stopped_early: bool


class FakeTrainer:
    def __init__(self, step_seconds: float = 0.0, fail_with: str | None = None):
        self.step_seconds = step_seconds
        self.fail_with = fail_with

    def __call__(self, spec, out_dir, *, resume=True, max_steps=None, callbacks=(), device=None):
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for subject in spec.subjects:  # the images the runner materialised must exist
            for image in subject.images:
                assert Path(image).is_file(), image
        ckpt = out_dir / "ckpt.json"
        step = json.loads(ckpt.read_text())["step"] if resume and ckpt.exists() else 0
        total = spec.total_steps
        with open(out_dir / "steps.log", "a") as log:
            log.write(f"start {step} pid {os.getpid()}\n")
        while step < (max_steps or total):
            for cb in callbacks:
                if getattr(cb, "should_stop", None) and cb.should_stop():
                    atomic_write_text(ckpt, json.dumps({"step": step}))
                    return FakeResult(None, step, total, True)
            time.sleep(self.step_seconds)
            step += 1
            with open(out_dir / "steps.log", "a") as log:
                log.write(f"step {step}\n")
            info = SimpleNamespace(step=step, total_steps=total, loss=1.0 / step, terms={"l_cst": 0.1},
                                   seconds_per_step=self.step_seconds, eta_seconds=(total - step) * self.step_seconds)
            for cb in callbacks:
                if hasattr(cb, "on_step"):
                    cb.on_step(info)
            if step % spec.train.checkpoint_every == 0:
                atomic_write_text(ckpt, json.dumps({"step": step}))
                for cb in callbacks:
                    if hasattr(cb, "on_checkpoint"):
                        cb.on_checkpoint(step, ckpt)
        adapter = out_dir / "adapter"
        weights = f"weights of {spec.tenant}/{spec.name}".encode() * 10
        atomic_write_bytes(adapter / "adapter.safetensors", weights)
        atomic_write_text(adapter / "manifest.json", json.dumps({
            "base_model": spec.base_model, "base_fingerprint": "fake-fp", "subjects": spec.tokens,
            "param_mode": spec.train.param_mode, "tenant": spec.tenant, "name": spec.name,
            "tensors_sha256": hashlib.sha256(weights).hexdigest(), "metrics": {"clip_t": 0.5}}))
        return FakeResult(adapter, step, total, False)
