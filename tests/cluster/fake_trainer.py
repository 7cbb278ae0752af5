"""A stand-in for the trainer with the `TrainFn` signature `(spec, run_dir, ctx)`: it steps through the spec's
steps, reporting through the attempt's real `ProgressSink`, resumes exactly from its own checkpoint file, and
ends with an adapter written by the real writer (`causalt2i.adapter.save_adapter`: safetensors + the format's
manifest), which the real loader (`causalt2i.adapter.load_adapter`) accepts.

No sleeps: a step waits on its `gate` when one is given. `ThreadGate` is for runs in this process
(InlineRunner), `FileGate` for runs in a Ray worker (a file holds how many steps may run).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, save_adapter
from causalt2i.atomic import atomic_write_text
from causalt2i.callbacks import StepInfo
from causalt2i.train_result import TrainResult

FAKE_FINGERPRINT = "fake-base-fingerprint"


class ThreadGate:
    """Steps wait here until the test allows them (`allow(n)` more, or `open()` for all)."""

    def __init__(self, allowed: int = 0):
        self._allowed = allowed
        self._open = False
        self._cond = threading.Condition()

    def allow(self, steps: int) -> None:
        with self._cond:
            self._allowed += steps
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait(self, step: int, stop) -> bool:
        """Wait until step `step` may run; False if `stop()` became true first."""
        with self._cond:
            while not (self._open or step <= self._allowed):
                if stop():
                    return False
                self._cond.wait(0.05)
        return True


class FileGate:
    """A gate across processes: the file holds the number of steps that may run (absent: none), or `open`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def allow_up_to(self, steps: int | str) -> None:
        atomic_write_text(self.path, str(steps))

    def wait(self, step: int, stop) -> bool:
        while True:
            text = self.path.read_text().strip() if self.path.exists() else "0"
            if text == "open" or step <= int(text):
                return True
            if stop():
                return False
            time.sleep(0.05)


class FakeTrainer:
    def __init__(self, gate: ThreadGate | FileGate | None = None, fail_with: str | None = None):
        self.gate = gate
        self.fail_with = fail_with

    def __call__(self, spec, run_dir, ctx) -> TrainResult:
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        out_dir = Path(run_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for subject in spec.subjects:  # the images the runner materialised must exist
            for image in subject.images:
                assert Path(image).is_file(), image
        ckpt = out_dir / "ckpt.json"
        step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        total = spec.total_steps
        with open(out_dir / "steps.log", "a") as log:
            log.write(f"start {step} pid {os.getpid()}\n")
        sink = ctx.progress
        while step < total:
            if ctx.cancelled() or (self.gate is not None and not self.gate.wait(step + 1, ctx.cancelled)):
                atomic_write_text(ckpt, json.dumps({"step": step}))
                sink.on_checkpoint(step, ckpt)  # as the real trainer's save() on a stop does (fenced: lost if cancelled)
                return TrainResult(adapter_dir=None, step=step, total_steps=total, stopped_early=True, stop_reason="cancelled")
            step += 1
            with open(out_dir / "steps.log", "a") as log:
                log.write(f"step {step}\n")
            sink.on_step(StepInfo(step=step, total_steps=total, loss=1.0 / step, terms={"cst": 0.1},
                                  seconds_per_step=0.0, eta_seconds=0.0))
            if step % spec.train.checkpoint_every == 0:
                atomic_write_text(ckpt, json.dumps({"step": step}))
                sink.on_checkpoint(step, ckpt)
                sink.on_diagnostics(step, {"mask_0_mean": 0.5})
        adapter = out_dir / "adapter"
        save_adapter(adapter, fake_adapter_tensors(spec), {
            "base_model": spec.base_model, "base_fingerprint": FAKE_FINGERPRINT,
            "subjects": [{"token": s.token, "class_word": s.class_word} for s in spec.subjects],
            "param_mode": spec.train.param_mode, "dtype": "float32", "training": spec.train.model_dump(),
            "metrics": {"clip_t": 0.5}, "tenant": spec.tenant, "name": spec.name, "step": step})
        return TrainResult(adapter_dir=adapter, step=step, total_steps=total, stopped_early=False)


def fake_adapter_tensors(spec) -> dict[str, torch.Tensor]:
    """Small tensors in the adapter's layout: one identifier-token row per subject in each text encoder, and an
    attn2 weight filled with a value derived from the tenant and name (so two jobs' adapters differ)."""
    n = len(spec.subjects)
    fill = float(sum(map(ord, f"{spec.tenant}/{spec.name}")) % 97)
    return {TE1_ROWS: torch.full((n, 8), fill), TE2_ROWS: torch.full((n, 4), fill),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.full((4, 8), fill)}


class StubbornTrainer:
    """A run that never stops by itself, not even when its row is cancelled (a hung data loader, a stuck
    collective, code in C that never returns to Python): it writes its pid to `run_dir/pid` and spins, swallowing
    the KeyboardInterrupt a plain `ray.cancel` raises. Only killing its worker ends it."""

    def __call__(self, spec, run_dir, ctx) -> TrainResult:
        out_dir = Path(run_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "pid", str(os.getpid()))
        while True:
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                continue
