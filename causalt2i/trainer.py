"""The single-process CausalT2I trainer: exact resume, periodic checkpoints, SIGTERM-safe, adapter export.

`train(spec, out_dir)` is the entry every runner calls (CLI, the control plane's Ray task, Ray Train
workers wrap the same `Trainer`). The run folder holds `spec.json`, `checkpoints/`, `metrics.jsonl`
and, when training finished, `adapter/`.

Exact resume: a checkpoint holds the trainable tensors, the optimizer and LR-schedule state, the noise
generator, the data-order RNG and the epoch's remaining order, the step and the loss history. N steps in
one go equal k steps, a stop, a resume and N − k more.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from causalt2i.adapter import save_adapter
from causalt2i.atomic import atomic_write_text
from causalt2i.callbacks import StepInfo, TrainerCallback
from causalt2i.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from causalt2i.data.images import load_subject_images
from causalt2i.data.merge import build_training_canvases
from causalt2i.method import CausalT2I
from causalt2i.models import SDXLParts, load_sdxl
from causalt2i.spec import SpecError, TuningSpec, check_spec_against_tokenizers

ADAPTER_DIR = "adapter"
SPEC_FILE = "spec.json"
WEIGHT_DECAY = 1e-2


class LocalOptimizerStep:
    """backward + AdamW step in this process. A distributed runner swaps in its own (e.g. a DeepSpeed engine)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_schedule):
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()


@dataclass
class TrainResult:
    adapter_dir: Path | None
    step: int
    total_steps: int
    stopped_early: bool
    stop_reason: str | None = None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    def __init__(
        self,
        spec: TuningSpec,
        run_dir: str | Path,
        *,
        device: torch.device | str | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        parts: SDXLParts | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        """`rank`/`world_size`: data parallelism over the merged canvases. Every rank walks the same epoch
        order and noise stream; step s gives rank r the r-th of the next `world_size` draws."""
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.cfg = spec.train
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.device = torch.device(device) if device is not None else default_device()
        parts = parts or load_sdxl(spec.base_model, image_encoder=spec.image_encoder, device=self.device)
        check_spec_against_tokenizers(spec, [parts.tokenizer, parts.tokenizer_2])
        subject_images = []
        for index, subject in enumerate(spec.subjects):
            try:
                subject_images.append(load_subject_images(subject.images))
            except ValueError as err:
                raise SpecError(f"subjects.{index}.images", str(err)) from None
        canvases = build_training_canvases(subject_images, resolution=self.cfg.resolution, seed=self.cfg.seed, k=self.cfg.num_canvases)
        torch.manual_seed(self.cfg.seed)  # SaCD's network and LoRA's A start from the seed
        self.model = CausalT2I(parts, spec)
        latent_generator = torch.Generator().manual_seed(self.cfg.seed)
        self.examples = [self.model.cache_example(canvas, latent_generator) for canvas in canvases]
        self.optimizer = torch.optim.AdamW(self.model.param_groups(), weight_decay=WEIGHT_DECAY)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.optimizer_step = LocalOptimizerStep(self.optimizer, self.lr_schedule)
        self.noise_generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        self.order_rng = random.Random(self.cfg.seed + 2)
        self.epoch_order: list[int] = []
        self.step = 0
        self.losses: list[float] = []
        self.last_terms: dict[str, float] = {}
        self._stop_signal: str | None = None

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps

    # --- state ----------------------------------------------------------------------------------------
    def progress_state(self) -> dict:
        """Everything but tensors and optimizer: step, RNG states, data order, losses."""
        return {
            "step": self.step,
            "noise_generator": self.noise_generator.get_state(),
            "order_rng": self.order_rng.getstate(),
            "epoch_order": list(self.epoch_order),
            "losses": list(self.losses),
            "last_terms": dict(self.last_terms),
            # torch's global generators drive LoRA dropout; restoring them keeps a resume exact.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_progress_state(self, state: dict) -> None:
        self.noise_generator.set_state(state["noise_generator"])
        self.order_rng.setstate(state["order_rng"])
        self.epoch_order = list(state["epoch_order"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.last_terms = dict(state.get("last_terms", {}))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def state_dict(self) -> dict:
        return {
            **self.progress_state(),
            "trainable": {k: v.detach().to("cpu").clone() for k, v in self.model.named_trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        named = self.model.named_trainable()
        if set(named) != set(state["trainable"]):
            missing = sorted(set(named) ^ set(state["trainable"]))[:3]
            raise ValueError(f"checkpoint does not match this model's trainable tensors (e.g. {missing})")
        with torch.no_grad():
            for name, tensor in named.items():
                tensor.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.load_progress_state(state)

    # --- one step -------------------------------------------------------------------------------------
    def _next_example(self) -> int:
        if not self.epoch_order:
            self.epoch_order = list(range(len(self.examples)))
            self.order_rng.shuffle(self.epoch_order)
        return self.epoch_order.pop()

    def _draw(self) -> tuple:
        """This rank's example, noise ε and timestep t for the next step (all ranks draw alike)."""
        num_timesteps = self.model.parts.noise_scheduler.config.num_train_timesteps
        mine = None
        for replica in range(self.world_size):
            example = self.examples[self._next_example()]
            # A CPU generator, so the sequence is the same on any device and restorable.
            noise = torch.randn(example.latents.shape, generator=self.noise_generator)
            timesteps = torch.randint(0, num_timesteps, (1,), generator=self.noise_generator)
            if replica == self.rank:
                mine = (example, noise.to(self.device), timesteps.to(self.device))
        return mine

    def train_step(self) -> dict[str, float]:
        example, noise, timesteps = self._draw()
        self.model.train()
        terms = self.model(example, noise, timesteps)
        loss = terms.total()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is not finite at step {self.step + 1}: {terms.as_floats()}")
        self.optimizer_step(loss)
        self.step += 1
        values = terms.as_floats()
        self.losses.append(float(loss.detach()))
        self.last_terms = values
        return values

    # --- the loop -------------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the newest checkpoint in the run folder, if any; return its step."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None
        state, _ = load_checkpoint(path)
        self.load_state_dict(state)
        return self.step

    def save(self) -> Path:
        meta = {"total_steps": self.total_steps, "loss": self.losses[-1] if self.losses else None, "terms": self.last_terms, "diagnostics": self.model.diagnostics()}
        path = save_checkpoint(self.run_dir, self.step, self.state_dict(), meta)
        for callback in self.callbacks:
            if hasattr(callback, "on_checkpoint"):
                callback.on_checkpoint(self.step, path)
            if hasattr(callback, "on_diagnostics"):
                callback.on_diagnostics(self.step, meta["diagnostics"])
        return path

    def _stop_requested(self) -> str | None:
        if self._stop_signal:
            return self._stop_signal
        if any(getattr(cb, "should_stop", None) and cb.should_stop() for cb in self.callbacks):
            return "cancelled"
        return None

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train to `total_steps`, or stop once the global step reaches `max_steps` (leaving a checkpoint)."""
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        resumed_from = self.step or None
        previous_handlers = self._install_stop_signals()
        try:
            started = time.perf_counter()
            done_here = 0
            while self.step < stop_at:
                reason = self._stop_requested()
                if reason:
                    self.save()
                    return self._result(stopped_early=True, reason=reason, resumed_from=resumed_from)
                terms = self.train_step()
                done_here += 1
                per_step = (time.perf_counter() - started) / done_here
                info = StepInfo(self.step, self.total_steps, self.losses[-1], terms, per_step, per_step * (self.total_steps - self.step))
                for callback in self.callbacks:
                    if hasattr(callback, "on_step"):
                        callback.on_step(info)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == stop_at:
                    self.save()
            if self.step < self.total_steps:
                return self._result(stopped_early=True, reason="max_steps", resumed_from=resumed_from)
            return self._result(stopped_early=False, reason=None, resumed_from=resumed_from, adapter_dir=self.export_adapter())
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _result(self, *, stopped_early: bool, reason: str | None, resumed_from: int | None, adapter_dir: Path | None = None) -> TrainResult:
        return TrainResult(adapter_dir=adapter_dir, step=self.step, total_steps=self.total_steps, stopped_early=stopped_early, stop_reason=reason, losses=list(self.losses), resumed_from=resumed_from)

    def _install_stop_signals(self) -> dict:
        """SIGTERM and SIGINT finish the current step, write a checkpoint and return (see `fit`)."""
        # Signal handlers can only be set from the main thread (Ray workers may run us elsewhere).
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum, name in ((signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")):
            previous[signum] = signal.signal(signum, lambda *_, name=name: setattr(self, "_stop_signal", name))
        return previous

    def export_adapter(self, out_dir: Path | None = None, *, master: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter; `master`: fp32 values of the trainable tensors when the module holds lower-precision copies."""
        out_dir = out_dir or self.run_dir / ADAPTER_DIR
        model = self.model
        cfg = self.cfg
        save_adapter(
            out_dir,
            model.adapter_tensors(master),
            {
                "base_model": self.spec.base_model,
                "base_fingerprint": model.parts.base_fingerprint(),
                "subjects": [{"token": s.token, "class_word": s.class_word} for s in self.spec.subjects],
                "param_mode": cfg.param_mode,
                **model.adapter_form(),
                "training": cfg.model_dump(),
                "metrics": {"final_loss": self.losses[-1] if self.losses else None, "terms": self.last_terms, **model.diagnostics()},
                "tenant": self.spec.tenant,
                "name": self.spec.name,
                "step": self.step,
            },
        )
        return out_dir


def _spec_record(spec: TuningSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True)


def prepare_run_dir(spec: TuningSpec, run_dir: str | Path, *, resume: bool) -> None:
    """Refuse to mix runs: a folder that holds another spec's run is never reused or overwritten."""
    run_dir = Path(run_dir)
    record = run_dir / SPEC_FILE
    if record.is_file():
        if record.read_text() != _spec_record(spec):
            raise SpecError("", f"{run_dir} holds a run of a different spec; use another --out folder")
        if not resume and latest_checkpoint(run_dir) is not None:
            raise SpecError("", f"{run_dir} already holds a run; pass --resume to continue it, or use another --out folder")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise SpecError("", f"{run_dir} is not empty and holds no run; use an empty or new --out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, _spec_record(spec))


def train(
    spec: TuningSpec,
    out_dir: str | Path,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    device: torch.device | str | None = None,
    parts: SDXLParts | None = None,
) -> TrainResult:
    """Validate, build, optionally resume, and train. Nothing is written before validation passes."""
    trainer = Trainer(spec, out_dir, device=device, callbacks=callbacks, parts=parts)
    prepare_run_dir(spec, out_dir, resume=resume)
    if resume:
        trainer.resume()
        adapter = Path(out_dir) / ADAPTER_DIR
        if trainer.step >= trainer.total_steps and (adapter / "manifest.json").is_file():
            return trainer._result(stopped_early=False, reason=None, resumed_from=trainer.step, adapter_dir=adapter)
    return trainer.fit(max_steps=max_steps)
