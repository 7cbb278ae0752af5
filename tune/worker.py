"""The Ray Train worker loop: one CausalT2I fine-tune, data-parallel over the merged canvases.

Every rank reports the same number of times (at each checkpoint step), each with its DeepSpeed shard,
so Ray Train merges one complete checkpoint per report. On a restart after a failure the loop resumes
from `ray.train.get_checkpoint()`, and reports the step it resumed from. At the last step rank 0 also
exports the adapter into the checkpoint, under `adapter/`.

Previews are rendered by rank 0 alone, at the steps the in-process trainer renders them (`Trainer.preview_due`),
and published with the job through the attempt's sink (`config["preview_sink"]`, a `cluster.progress_sink.ProgressSink`,
which pickles) exactly as the in-process trainer's callback publishes them. The other ranks go on to the next
step and wait for rank 0 in its gradient all-reduce. A search trial's workers get no sink: its trials are not the
job's previews.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from tune.startup_trace import mark, process_started

mark("worker: import tune.worker")
import ray.train  # noqa: E402
import torch  # noqa: E402

from causalt2i.spec import TuningSpec  # noqa: E402
from causalt2i.trainer import Trainer  # noqa: E402
from tune.engine import attach_deepspeed, fp32_masters, load_deepspeed_checkpoint, save_deepspeed_checkpoint  # noqa: E402

mark("worker: tune.worker imported")


def _maybe_inject_fault(fault: dict | None, rank: int, step: int) -> None:
    """Test hook: kill this worker process (SIGKILL, no cleanup) once, at `fault['step']` on `fault['rank']`."""
    if not fault or rank != fault["rank"] or step != fault["step"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step}\n")
    # Give the controller time to collect the reports already made, as real step times would.
    time.sleep(float(fault.get("delay_s", 3.0)))
    os.kill(os.getpid(), signal.SIGKILL)


class PreviewPublisher:
    """The trainer callback of rank 0 that hands each rendered preview to the attempt's sink (and nothing else: the
    worker loop reports progress and checkpoints through `ray.train.report`)."""

    def __init__(self, sink):
        self.sink = sink

    def on_preview(self, step: int, folder: Path) -> None:
        self.sink.on_preview(step, folder)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    mark("worker: loop entered", process_started=process_started())
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    spec: TuningSpec = config["spec"]
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    device = ray.train.torch.get_device()
    scratch = Path(tempfile.mkdtemp(prefix="ct2i-worker-"))
    sink = config.get("preview_sink")
    callbacks = [PreviewPublisher(sink)] if sink is not None and rank == 0 else []
    trainer = Trainer(spec, scratch, device=device, rank=rank, world_size=world_size, callbacks=callbacks)
    mark("worker: trainer built")
    engine = attach_deepspeed(trainer, zero_stage=int(config.get("zero_stage", 2)))
    mark("worker: deepspeed initialised")

    resumed_from = -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resumed_from = load_deepspeed_checkpoint(trainer, engine, directory)

    total = trainer.total_steps
    every = spec.train.checkpoint_every
    progress_every = max(1, int(config.get("progress_every", 10)))
    started, done_here = time.perf_counter(), 0
    while trainer.step < total:
        terms = trainer.train_step()
        done_here += 1
        if done_here == 1:
            mark("worker: step 1 done", step=trainer.step)
        _maybe_inject_fault(config.get("fault"), rank, trainer.step)
        if callbacks and trainer.preview_due():
            trainer.preview()
        checkpoint_due = trainer.step % every == 0 or trainer.step == total
        if not checkpoint_due and trainer.step % progress_every:
            continue
        per_step = (time.perf_counter() - started) / done_here
        metrics = {"step": trainer.step, "total_steps": total, "loss": trainer.losses[-1], "resumed_from": resumed_from,
                   "seconds_per_step": per_step, "eta_seconds": per_step * (total - trainer.step), **terms}
        if not checkpoint_due:
            ray.train.report(metrics)  # progress only; every rank reports, so reports stay in step
            continue
        metrics.update({f"diag_{k}": v for k, v in trainer.diagnostics().items()})
        with tempfile.TemporaryDirectory(prefix="ct2i-ckpt-") as directory:
            save_deepspeed_checkpoint(trainer, engine, directory)
            if trainer.step == total:
                masters = fp32_masters(trainer, engine)  # collective: every rank takes part
                if rank == 0:
                    trainer.export_adapter(Path(directory) / config["adapter_subdir"], master=masters)
            mark("worker: checkpoint saved", step=trainer.step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            mark("worker: checkpoint reported", step=trainer.step)
