"""The single-process CausalT2I trainer: exact resume, periodic checkpoints, SIGTERM-safe, adapter export.

`train(spec, out_dir)` is the entry every runner calls (CLI, the control plane's Ray task, Ray Train
workers wrap the same `Trainer`). The run folder holds `spec.json`, `checkpoints/`, `metrics.jsonl`
and, when training finished, `adapter/`.

Exact resume: a checkpoint holds the trainable tensors, the optimizer and LR-schedule state, the noise
generator, the data-order RNG and the epoch's remaining order, the step, the loss history and the
`alpha: auto` calibration (its warm-up records, then α). N steps in one go equal k steps, a stop, a
resume and N − k more, on either side of the warm-up's end.

Host syncs: a step queues its loss terms on the device; they reach the host together once per
`log_every` steps (and at checkpoints, the α calibration and the end), where they are checked for
non-finite values and handed to the callbacks. Noise and timesteps are drawn on the training device
from a generator kept in the checkpoint, and the fixed prompts are tokenized once, so nothing else
waits for the device. A non-finite loss therefore stops the run up to `log_every` steps late, but before
any checkpoint holds it.
"""

from __future__ import annotations

import json
import random
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from causalt2i.adapter import save_adapter
from causalt2i.adapter_format import tensor_dtypes
from causalt2i.atomic import atomic_write_text
from causalt2i.callbacks import StepInfo, TrainerCallback
from causalt2i.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from causalt2i.data.images import load_subject_images
from causalt2i.data.merge import build_training_canvases
from causalt2i.method import CausalT2I, Probe
from causalt2i.models import SDXLParts, attn2_state, load_sdxl, resolve_dtype
from causalt2i.spec import SpecError, TuningSpec, check_spec_against_tokenizers
from causalt2i.train_result import TrainResult  # also re-exported: what fit() returns

ADAPTER_DIR = "adapter"
SPEC_FILE = "spec.json"
WEIGHT_DECAY = 1e-2
FLUSHED_KEPT = 1000


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class AlphaCalibration:
    """`alpha: auto` (paper §IV-G; METHOD.md, "α").

    Over the first `warmup` steps L_cst is computed but weighted 0, and each step's L_cdm and un-weighted
    Σ ratio are recorded (on the device, no sync). After step `warmup`, α = median(L_cdm) / median(Σ ratio),
    so that α · ratio has L_cdm's median magnitude, times `scale` (`train.alpha_scale`, the axis a search over α
    samples), and it stays fixed. A number in the spec is used as is.
    """

    def __init__(self, alpha: float | str, warmup: int, scale: float = 1.0):
        self.fixed = alpha != "auto"
        self.scale = scale
        self.warmup = 0 if self.fixed else warmup
        self.value: float | None = float(alpha) if self.fixed else None
        self.records: list[torch.Tensor | list[float]] = []

    def alpha_for(self, step: int) -> float:
        """The weight of L_cst at (1-based) `step`: 0 during the warm-up, then the calibrated α."""
        if step <= self.warmup or self.value is None:
            return 0.0
        return self.value

    def record(self, step: int, cdm: torch.Tensor, ratio: torch.Tensor) -> None:
        if self.value is not None or step > self.warmup:
            return
        self.records.append(torch.stack([cdm.detach().float(), ratio.detach().float()]))
        if step == self.warmup:
            pairs = self._host_records()
            cdm_median = statistics.median(p[0] for p in pairs)
            ratio_median = statistics.median(p[1] for p in pairs)
            # The shifted ratio is positive; `raw` can make the median negative, hence the magnitude.
            self.value = self.scale * cdm_median / max(abs(ratio_median), 1e-12)
            self.records = []

    def _host_records(self) -> list[list[float]]:
        device = [r for r in self.records if isinstance(r, torch.Tensor)]
        on_host = iter(torch.stack(device).tolist() if device else [])
        return [r if not isinstance(r, torch.Tensor) else next(on_host) for r in self.records]

    def state(self) -> dict:
        return {"value": self.value, "records": self._host_records(), "warmup": self.warmup}

    def load_state(self, state: dict) -> None:
        if state["warmup"] != self.warmup:
            raise ValueError(f"checkpoint calibrates alpha over {state['warmup']} steps, this spec over {self.warmup}")
        self.value = state["value"] if not self.fixed else self.value
        self.records = [list(r) for r in state["records"]]


class StepTerms(Mapping):
    """One step's loss terms as floats, read from the device only when first looked at."""

    def __init__(self, trainer: "Trainer", step: int):
        self._trainer = trainer
        self._step = step

    def _values(self) -> dict[str, float]:
        return self._trainer.terms_of(self._step)

    def __getitem__(self, key: str) -> float:
        return self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


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
        self.dtype = resolve_dtype(self.cfg.dtype_policy, self.device)
        parts = parts or load_sdxl(spec.base_model, image_encoder=spec.image_encoder, vae=spec.vae)
        # Full mode trains attn2 from the base's own values and stores ΔW against them: take them before a
        # 16-bit policy rounds them (CausalT2I restores them into its fp32 masters).
        base_attn2 = None
        if self.cfg.param_mode == "full" and self.dtype != torch.float32:
            base_attn2 = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in attn2_state(parts.unet).items()}
        parts.to(self.device, self.dtype)
        check_spec_against_tokenizers(spec, [parts.tokenizer, parts.tokenizer_2])
        subject_images = []
        for index, subject in enumerate(spec.subjects):
            try:
                subject_images.append(load_subject_images(subject.images))
            except ValueError as err:
                raise SpecError(f"subjects.{index}.images", str(err)) from None
        canvases = build_training_canvases(subject_images, resolution=self.cfg.resolution, seed=self.cfg.seed, k=self.cfg.num_canvases)
        torch.manual_seed(self.cfg.seed)  # SaCD's network and LoRA's A start from the seed
        self.model = CausalT2I(parts, spec, base_attn2=base_attn2)
        latent_generator = torch.Generator().manual_seed(self.cfg.seed)
        self.examples = [self.model.cache_example(canvas, latent_generator) for canvas in canvases]
        self.optimizer = torch.optim.AdamW(self.model.param_groups(), weight_decay=WEIGHT_DECAY)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.optimizer_step = LocalOptimizerStep(self.optimizer, self.lr_schedule)
        # On the training device, so drawing ε and t never copies from the host (a CUDA generator's state
        # is saved and restored like a CPU one's).
        self.noise_generator = torch.Generator(self.device).manual_seed(self.cfg.seed + 1)
        self.order_rng = random.Random(self.cfg.seed + 2)
        self.epoch_order: list[int] = []
        self.step = 0
        self.alpha = AlphaCalibration(self.cfg.alpha, spec.alpha_warmup_steps, self.cfg.alpha_scale)
        self.probes = self._make_probes()
        self._losses: list[float] = []
        self._last_terms: dict[str, float] = {}
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []  # (step, names, stacked values on device)
        self._flushed: dict[int, dict[str, float]] = {}  # terms of the steps flushed since the callbacks last saw them
        self._stop_signal: str | None = None

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps

    @property
    def losses(self) -> list[float]:
        """The total loss of every step so far (reading it brings queued steps to the host)."""
        self.flush()
        return self._losses

    @property
    def last_terms(self) -> dict[str, float]:
        self.flush()
        return self._last_terms

    def _make_probes(self) -> list[Probe]:
        """One fixed (ε, t) per canvas for the diagnostics, from its own seed: the training stream is untouched."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed + 3)
        num_timesteps = self.model.parts.noise_scheduler.config.num_train_timesteps
        return [
            Probe(example, torch.randn(example.latents.shape, generator=generator, device=self.device), torch.randint(0, num_timesteps, (1,), generator=generator, device=self.device))
            for example in self.examples
        ]

    def diagnostics(self) -> dict:
        """`CausalT2I.diagnostics` on the fixed probes at the α the next step trains with, plus α itself."""
        return {"alpha": self.alpha.value, **self.model.diagnostics(self.probes, self.alpha.alpha_for(self.step + 1))}

    # --- state ----------------------------------------------------------------------------------------
    def progress_state(self) -> dict:
        """Everything but tensors and optimizer: step, RNG states, data order, losses, the α calibration."""
        return {
            "step": self.step,
            "noise_generator": self.noise_generator.get_state(),
            "noise_device": self.device.type,
            "order_rng": self.order_rng.getstate(),
            "epoch_order": list(self.epoch_order),
            "losses": list(self.losses),
            "last_terms": dict(self.last_terms),
            # torch's global generators drive LoRA dropout; restoring them keeps a resume exact.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "alpha": self.alpha.state(),
        }

    def load_progress_state(self, state: dict) -> None:
        if state.get("noise_device", "cpu") != self.device.type:
            raise ValueError(f"checkpoint drew its noise on {state.get('noise_device', 'cpu')}, this run is on {self.device.type}; an exact resume needs the same kind of device")
        self.noise_generator.set_state(state["noise_generator"])
        self.order_rng.setstate(state["order_rng"])
        self.epoch_order = list(state["epoch_order"])
        self.step = int(state["step"])
        self._pending = []
        self._flushed = {}
        self._losses = list(state["losses"])
        self._last_terms = dict(state.get("last_terms", {}))
        self.alpha.load_state(state["alpha"])
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
            noise = torch.randn(example.latents.shape, generator=self.noise_generator, device=self.device)
            timesteps = torch.randint(0, num_timesteps, (1,), generator=self.noise_generator, device=self.device)
            if replica == self.rank:
                mine = (example, noise, timesteps)
        return mine

    def train_step(self) -> StepTerms:
        """One optimizer step. The returned terms are read from the device only when looked at."""
        example, noise, timesteps = self._draw()
        self.model.train()
        step = self.step + 1
        terms = self.model(example, noise, timesteps, self.alpha.alpha_for(step))
        loss = terms.total()
        self.optimizer_step(loss)
        self.step = step
        self._pending.append((step, terms.names(), terms.stacked()))
        self.alpha.record(step, terms.cdm, terms.cst_ratio)
        return StepTerms(self, step)

    def flush(self) -> list[int]:
        """Bring the queued steps' terms to the host (one copy), check them, and return those steps."""
        if not self._pending:
            return []
        values = torch.stack([stacked for _, _, stacked in self._pending]).tolist()
        flushed = []
        for (step, names, _), row in zip(self._pending, values):
            named = dict(zip(names, row))
            loss = named.pop("loss")
            named["alpha"] = self.alpha.alpha_for(step)
            if not all(map(_finite, row)):
                self._pending = []
                raise FloatingPointError(f"loss is not finite at step {step}: loss={loss} {named}")
            self._losses.append(loss)
            self._last_terms = named
            self._flushed[step] = named
            flushed.append(step)
        self._pending = []
        for old in sorted(self._flushed)[:-FLUSHED_KEPT]:  # callers that never report (e.g. a Ray worker) read only recent steps
            del self._flushed[old]
        return flushed

    def terms_of(self, step: int) -> dict[str, float]:
        """The terms of a step not yet handed to the callbacks (flushing if it is still queued)."""
        if any(queued == step for queued, _, _ in self._pending):
            self.flush()
        return self._flushed.get(step, self._last_terms if step == self.step else {})

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
        """A checkpoint with the diagnostics on the fixed probes in its meta.json (and to the callbacks)."""
        meta = {"total_steps": self.total_steps, "loss": self.losses[-1] if self.losses else None, "terms": self.last_terms, "alpha": self.alpha.value, "diagnostics": self.diagnostics()}
        path = save_checkpoint(self.run_dir, self.step, self.state_dict(), meta)
        for callback in self.callbacks:
            if hasattr(callback, "on_checkpoint"):
                callback.on_checkpoint(self.step, path)
            if hasattr(callback, "on_diagnostics"):
                callback.on_diagnostics(self.step, meta["diagnostics"])
        return path

    def preview_due(self) -> bool:
        """A preview every `spec.preview_interval` steps and at the last step (none when the interval is 0)."""
        every = self.spec.preview_interval
        return self.rank == 0 and every > 0 and (self.step % every == 0 or self.step == self.total_steps)

    def preview(self) -> Path:
        """Render the training preview at this step (`causalt2i.preview`) and hand it to the callbacks' `on_preview`.

        The render leaves the training RNGs and the modules' modes as they were: a run with previews equals one without."""
        from causalt2i.preview import render_preview

        folder = render_preview(self.model.parts, self.model.token_ids, self.spec.preview_prompts(), seed=self.cfg.seed,
                                step=self.step, run_dir=self.run_dir, modules=[self.model],
                                autocast=self.model.autocast())
        for callback in self.callbacks:
            if hasattr(callback, "on_preview"):
                callback.on_preview(self.step, folder)
        return folder

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
                    self._report(started, done_here)
                    self.save()
                    return self._result(stopped_early=True, reason=reason, resumed_from=resumed_from)
                self.train_step()
                done_here += 1
                checkpoint_due = self.step % self.cfg.checkpoint_every == 0 or self.step == stop_at
                if checkpoint_due or self.step % self.cfg.log_every == 0:
                    self._report(started, done_here)
                if checkpoint_due:
                    self.save()
                if self.preview_due():
                    self.preview()
            if self.step < self.total_steps:
                return self._result(stopped_early=True, reason="max_steps", resumed_from=resumed_from)
            return self._result(stopped_early=False, reason=None, resumed_from=resumed_from, adapter_dir=self.export_adapter())
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _report(self, started: float, done_here: int) -> None:
        """Flush the queued steps and hand each to the callbacks' `on_step`, in order."""
        self.flush()
        per_step = (time.perf_counter() - started) / max(done_here, 1)
        losses = self._losses
        for step in sorted(self._flushed):
            info = StepInfo(step, self.total_steps, losses[step - 1] if len(losses) >= step else losses[-1], self._flushed[step], per_step, per_step * (self.total_steps - step))
            for callback in self.callbacks:
                if hasattr(callback, "on_step"):
                    callback.on_step(info)
        self._flushed = {}

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
        tensors = model.adapter_tensors(master)
        save_adapter(
            out_dir,
            tensors,
            {
                "base_model": self.spec.base_model,
                "base_fingerprint": model.parts.base_fingerprint(),
                "subjects": [{"token": s.token, "class_word": s.class_word} for s in self.spec.subjects],
                "param_mode": cfg.param_mode,
                **model.adapter_form(),
                "tensor_dtypes": tensor_dtypes(tensors),
                "alpha": self.alpha.value,
                # world_size: how many data-parallel ranks trained it (the spec's `num_workers` as it ran).
                "training": {**cfg.model_dump(), "world_size": self.world_size},
                "metrics": {"final_loss": self.losses[-1] if self.losses else None, "terms": self.last_terms, **self.diagnostics()},
                "tenant": self.spec.tenant,
                "name": self.spec.name,
                "step": self.step,
            },
        )
        return out_dir


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


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
