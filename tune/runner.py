"""The Ray Train runner: each admitted job is a Ray Train run (a `search:` spec, a Ray Tune search).

`RayTrainFn` is a `cluster.runner.TrainFn`: the control plane's attempt body (`execute_attempt`: inputs, fenced
progress, publish, register) calls it in place of the in-process trainer. `ray_train_runner()` runs that body
as a Ray task holding no resources (the Train workers hold the CPUs and GPUs the spec's `resources` section
asks for).

The run is named `<tenant>--<job>` under `<artifacts>/ray-train`, the same storage the control plane uses,
so a retried attempt finds the run's checkpoints and resumes rather than restarts. Inside one attempt,
`FailureConfig(max_failures=2)` restarts lost workers from the last reported checkpoint. A worker group that
cannot start within `scheduler.worker_start_timeout_s` fails the job with `WorkerGroupDidNotStart`, which
names the resources it waited for.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray

from causalt2i.spec import TuningSpec
from causalt2i.train_result import TrainResult
from cluster.runner import AttemptContext, RayTaskRunner
from tune.progress import JobProgressCallback
from tune.startup_trace import mark
from tune.train_run import (ADAPTER_SUBDIR, build_torch_trainer, preemption_watcher_env, storage_path, worker_resources,
                             worker_start_timeout_env)

CANCEL_POLL_SECONDS = 1.0


class WorkerGroupDidNotStart(RuntimeError):
    """The Train workers could not be placed within the configured time (the cluster is full or too small)."""


@ray.remote(num_cpus=0, max_retries=0)
def _fit(trainer, train_env: dict[str, str]) -> dict:
    """Drive one `fit()`. Ray Train hands the controller the `RAY_TRAIN_*` variables of this process's environment,
    so they (the worker-group timeout, the preemption watcher switch) are set here rather than as a runtime env
    of this task: a task with its own runtime env cannot run in one of Ray's already started (and already
    imported) worker processes, and waited for a fresh one (10 s on a loaded 2-core machine)."""
    os.environ.update(train_env)
    mark("fit task: started")
    result = trainer.fit()
    mark("fit task: fit returned")
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    return {"checkpoint": result.checkpoint, "metrics": dict(result.metrics or {})}


def _did_not_start(err: BaseException, spec: TuningSpec, use_gpu: bool, timeout_s: float) -> WorkerGroupDidNotStart | None:
    text = f"{type(err).__name__}: {err}"
    if "WorkerGroupStartupTimeoutError" not in text and "worker group startup timed out" not in text:
        return None
    return WorkerGroupDidNotStart(
        f"resources: the worker group ({spec.resources.num_workers} × {worker_resources(spec, use_gpu)}) could not start "
        f"within {timeout_s:g} s; the cluster is busy or too small for it")


@ray.remote(max_retries=0)
def _evaluate_task(spec: TuningSpec, checkpoint, metrics) -> dict[str, bytes]:
    """`cluster.evaluation.evaluate_tuning` of the run's final adapter, in a task holding one Train worker's
    resources (the driving task holds none), after the workers have released theirs."""
    import tempfile

    import torch

    from cluster.evaluation import evaluate_tuning

    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="ct2i-eval-adapter-") as scratch:
        adapter_dir = Path(checkpoint.to_directory(scratch)) / ADAPTER_SUBDIR
        return evaluate_tuning(spec, adapter_dir, metrics)


@dataclass(frozen=True)
class RayTrainFn:
    """Train one attempt on Ray Train (or, with `search:`, run its Ray Tune search). `trials` picks how a search
    trial trains: `ray_train` (each trial a TorchTrainer, the production path) or `in_process` (the trainer
    inside the trial, for one-box runs and tests). `fault` is the worker-kill test hook of `tune.worker`."""

    trials: Literal["ray_train", "in_process"] = "ray_train"
    fault: dict | None = None

    def __call__(self, spec: TuningSpec, run_dir: Path, ctx: AttemptContext) -> TrainResult:
        mark("attempt task: train_fn called")
        storage = storage_path(ctx.settings.artifacts_uri)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        timeout_s = ctx.settings.scheduler.worker_start_timeout_s
        alive_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        # For every Train controller this attempt starts: the fit task's below, or each search trial's.
        train_env = {**worker_start_timeout_env(timeout_s),
                     **preemption_watcher_env(ctx.settings.scheduler.preemption_watcher, alive_nodes=alive_nodes,
                                              can_add_nodes=bool(ctx.settings.node_types))}
        if spec.search is not None:
            from tune.search import run_search

            return run_search(spec, run_dir, storage=storage, use_gpu=use_gpu, ctx=ctx, trials=self.trials,
                              train_env=train_env)
        trainer = build_torch_trainer(spec, name=ctx.run_name, storage=storage, use_gpu=use_gpu,
                                      callbacks=[JobProgressCallback(ctx.progress)], fault=self.fault,
                                      preview_sink=ctx.progress)
        mark("attempt task: TorchTrainer built")
        # The fit task (and so the Train controller, which Ray Train puts on the fit's node) runs beside this
        # attempt: a zero-CPU task may otherwise spill to a busy worker node, and a lost worker node would then
        # end the attempt instead of costing a worker-group restart from the checkpoint in `storage`.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ref = _fit.options(scheduling_strategy=here).remote(trainer, train_env)
        while True:
            ready, _ = ray.wait([ref], timeout=CANCEL_POLL_SECONDS)
            if ready:
                break
            if ctx.cancelled():
                # Cancelling the driving task kills the Train controller it owns, and with it the workers.
                ray.cancel(ref, force=True)
                return TrainResult(adapter_dir=None, step=0, total_steps=spec.total_steps, stopped_early=True,
                                   stop_reason="cancelled")
        try:
            outcome = ray.get(ref)
        except Exception as err:
            reason = _did_not_start(err, spec, use_gpu, timeout_s)
            if reason is not None:
                raise reason from None
            raise
        local = Path(run_dir)
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        checkpoint_copy = Path(outcome["checkpoint"].to_directory(str(local / "checkpoint")))
        if spec.evaluation is not None:
            from cluster.evaluation import write_report

            task = _evaluate_task.options(num_cpus=spec.resources.cpus_per_worker,
                                          num_gpus=spec.resources.gpus_per_worker if use_gpu else 0)
            write_report(checkpoint_copy / ADAPTER_SUBDIR, ray.get(task.remote(spec, outcome["checkpoint"], ctx.settings.metrics)))
        metrics = outcome["metrics"]
        resumed = metrics.get("resumed_from", -1)
        return TrainResult(adapter_dir=checkpoint_copy / ADAPTER_SUBDIR, step=int(metrics.get("step", spec.total_steps)),
                           total_steps=spec.total_steps, stopped_early=False, resumed_from=resumed if resumed >= 0 else None)


def ray_train_runner(train_fn: RayTrainFn | None = None) -> RayTaskRunner:
    """The control plane's runner for Ray Train: a zero-resource driver task per attempt running
    `execute_attempt(train_fn=RayTrainFn())`, on the scheduler's node; the Train workers hold the job's CPUs and
    GPUs, wherever Ray places them, and a lost worker node costs a worker-group restart from the last
    checkpoint under the run's shared `storage_path` (tests/faults/test_node_loss.py)."""
    return RayTaskRunner(train_fn=train_fn or RayTrainFn(), num_cpus=0, hold_gpus=False, task_name="ct2i-train",
                         kind="ray_train", beside_scheduler=True)
