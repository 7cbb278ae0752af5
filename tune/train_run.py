"""One Ray Train run of the CausalT2I trainer: the `TorchTrainer` both a job (`tune.runner`) and a search trial
(`tune.search`) build, named and stored so that a retried attempt resumes rather than restarts."""

from __future__ import annotations

from causalt2i.spec import TuningSpec

DEFAULT_MAX_FAILURES = 2
ADAPTER_SUBDIR = "adapter"  # where the last checkpoint holds the exported adapter
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def storage_path(artifacts_uri: str) -> str:
    """Ray Train's `storage_path`: inside the artifact store, local folder or `s3://` / `gs://`."""
    return artifacts_uri.rstrip("/") + "/ray-train"


def worker_resources(spec: TuningSpec, use_gpu: bool) -> dict[str, float]:
    per_worker = {"CPU": spec.resources.cpus_per_worker}
    if use_gpu and spec.resources.gpus_per_worker > 0:
        per_worker["GPU"] = spec.resources.gpus_per_worker
    return per_worker


def train_loop(config: dict) -> None:
    """The Train workers' entry point. Ray pickles it by reference, so every process that unpickles the trainer
    (the driving task, the Train controller) imports this light module, and only the workers import
    `tune.worker` with torch, diffusers and DeepSpeed behind it (~15 s of imports on a loaded 2-core machine)."""
    from tune.worker import train_loop_per_worker

    train_loop_per_worker(config)


def build_torch_trainer(spec: TuningSpec, *, name: str, storage: str, use_gpu: bool, callbacks: list | None = None,
                        fault: dict | None = None, max_failures: int = DEFAULT_MAX_FAILURES, zero_stage: int = 2,
                        preview_sink=None):
    """A TorchTrainer running `tune.worker.train_loop_per_worker` on `spec`.

    A worker group that cannot start (its placement group is not ready within
    `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, which `tune.runner` sets from the platform's settings) fails the
    run at once (`controller_failure_limit=0`) instead of being retried forever; lost workers of a started
    group are still restarted from the last checkpoint, `max_failures` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = use_gpu and spec.resources.gpus_per_worker > 0
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "zero_stage": zero_stage, "fault": fault, "adapter_subdir": ADAPTER_SUBDIR,
                           "preview_sink": preview_sink,
                           "torch_threads": max(1, int(spec.resources.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=spec.resources.num_workers, use_gpu=gpu,
                                     resources_per_worker=worker_resources(spec, use_gpu)),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks or [])),
    )


def worker_start_timeout_env(seconds: float) -> dict[str, str]:
    """The environment variable that bounds a Train controller's wait for its worker group (it reads it at start;
    Ray Train copies it from the driving process's environment into the controller's)."""
    return {WORKER_START_TIMEOUT_ENV: str(float(seconds))}


def preemption_watcher_env(mode: str, *, alive_nodes: int, can_add_nodes: bool) -> dict[str, str]:
    """The variable that switches Ray Train's preemption watcher (`scheduler.preemption_watcher`) for one run.

    `auto` keeps it wherever a Train worker can run on a node other than the controller's: more than one node is
    alive, or the cluster autoscales (`node_types` set), so the head may be alone when the job is admitted. On a
    fixed one-node cluster it has nothing to save (a drained node takes the controller and the run with it) and
    costs a fresh Ray process per run, booting beside the worker's imports.
    """
    enabled = mode == "on" or (mode == "auto" and (alive_nodes > 1 or can_add_nodes))
    return {PREEMPTION_WATCHER_ENV: "1" if enabled else "0"}
