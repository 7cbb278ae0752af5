"""`ray_train_runner`: the control plane's `Runner` that runs each admitted job as a Ray Train run.

The attempt's driver is a Ray task holding no resources (the Train workers hold the GPUs and CPUs the
spec's `resources` section asks for). It reuses the control plane's attempt body
(`cluster.runner.execute_attempt`: inputs, fenced progress, publish, register) with `ray_train_fn`
in place of the in-process trainer.

The run is named `<tenant>--<job>` under `<artifacts>/ray-train`, the same storage the control plane
uses, so a retried attempt finds the run's checkpoints and resumes rather than restarts. Inside one
attempt, `FailureConfig(max_failures=2)` restarts lost workers from the last reported checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ray

from causalt2i.spec import TuningSpec
from causalt2i.trainer import TrainResult
from cluster.runner import RayTaskRunner
from tune.progress import JobProgressCallback, ProgressTarget
from tune.worker import ADAPTER_SUBDIR, train_loop_per_worker

DEFAULT_MAX_FAILURES = 2
CANCEL_POLL_SECONDS = 1.0


def run_name(tenant: str, job_id: str) -> str:
    return f"{tenant}--{job_id}"


def storage_path(artifacts_uri: str) -> str:
    """Ray Train's `storage_path`: inside the artifact store, local folder or `s3://` / `gs://`."""
    return artifacts_uri.rstrip("/") + "/ray-train"


def build_torch_trainer(spec: TuningSpec, *, name: str, storage: str, use_gpu: bool, progress: ProgressTarget | None = None,
                        fault: dict | None = None, max_failures: int = DEFAULT_MAX_FAILURES, zero_stage: int = 2,
                        extra_callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = spec.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu and resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    callbacks = list(extra_callbacks or [])
    if progress is not None:
        callbacks.append(JobProgressCallback(progress))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "zero_stage": zero_stage, "fault": fault,
                           "torch_threads": max(1, int(resources.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu and resources.gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu and resources.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


class UnplaceableJob(ValueError):
    """A worker asks for more than any node of the cluster has: Ray would leave it pending forever."""


def check_placeable(spec: TuningSpec, *, use_gpu: bool) -> None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    want_cpu = spec.resources.cpus_per_worker
    want_gpu = spec.resources.gpus_per_worker if use_gpu else 0.0
    if any(node.get("CPU", 0) >= want_cpu and node.get("GPU", 0) >= want_gpu for node in nodes):
        return
    largest = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
    # Autoscaling clusters (KubeRay) may add bigger nodes than exist now: only refuse without an autoscaler.
    if ray.cluster_resources().get("CPU", 0) and not _autoscaling():
        raise UnplaceableJob(f"resources: a worker needs {want_cpu:g} CPU and {want_gpu:g} GPU, but the largest node has "
                             f"{largest[0]:g} CPU and {largest[1]:g} GPU")


def _autoscaling() -> bool:
    import os

    return os.environ.get("CT2I_AUTOSCALING", "0") == "1"


@ray.remote(num_cpus=0, max_retries=0)
def _fit(trainer) -> dict:
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    return {"checkpoint": result.checkpoint, "metrics": dict(result.metrics or {})}


def ray_train_fn(spec: TuningSpec, run_dir: Path, *, resume: bool = True, callbacks=(), device=None,
                 fault: dict | None = None) -> TrainResult:
    """The control plane's `train_fn`, on Ray Train. Polls the attempt's fence to honour cancellation."""
    fence = next((cb for cb in callbacks if hasattr(cb, "should_stop")), None)
    target = ProgressTarget.from_run_callbacks(fence) if fence is not None else None
    name = run_name(spec.tenant, target.job_id if target else Path(run_dir).parent.name)
    storage = storage_path(target.settings.artifacts_uri) if target else str(Path(run_dir) / "ray-train")
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if spec.search is not None:
        from tune.search import run_search

        # A search polls the same fence itself, through a Tune stopper.
        return run_search(spec, run_dir, storage=storage, use_gpu=use_gpu, fence=fence,
                          job_id=target.job_id if target else None)
    trainer = build_torch_trainer(spec, name=name, storage=storage, use_gpu=use_gpu, progress=target, fault=fault)
    ref = _fit.remote(trainer)
    while True:
        ready, _ = ray.wait([ref], timeout=CANCEL_POLL_SECONDS)
        if ready:
            break
        if fence is not None and fence.should_stop():
            # Cancelling the driving task kills the Train controller it owns, and with it the workers.
            ray.cancel(ref, force=True)
            return TrainResult(adapter_dir=None, step=0, total_steps=spec.total_steps, stopped_early=True, stop_reason="cancelled")
    outcome = ray.get(ref)
    local = Path(run_dir)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    checkpoint_copy = Path(outcome["checkpoint"].to_directory(str(local / "checkpoint")))
    adapter_dir = checkpoint_copy / ADAPTER_SUBDIR
    metrics = outcome["metrics"]
    resumed = metrics.get("resumed_from", -1)
    return TrainResult(adapter_dir=adapter_dir, step=int(metrics.get("step", spec.total_steps)), total_steps=spec.total_steps,
                       stopped_early=False, resumed_from=resumed if resumed >= 0 else None)


def ray_train_runner(fault: dict | None = None) -> RayTaskRunner:
    """The control plane's runner for Ray Train: a zero-resource driver task per attempt running
    `execute_attempt(train_fn=ray_train_fn)`; the Train workers hold the job's CPUs and GPUs."""
    train_fn = ray_train_fn if fault is None else _with_fault(fault)
    return RayTaskRunner(train_fn=train_fn, num_cpus=0, hold_gpus=False, task_name="ct2i-train")


def _with_fault(fault: dict):
    def train_fn(spec, run_dir, **kwargs):
        return ray_train_fn(spec, run_dir, fault=fault, **kwargs)

    return train_fn
