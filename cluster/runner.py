"""Running an admitted job: the `TrainFn` seam, the attempt's context, the run body `execute_attempt`, and the
runners that launch it (`RayTaskRunner`, `InlineRunner`; `tune.runner` adds the Ray Train one).

A run owns its job row only while `state = 'running' AND attempts = <its attempt>` holds: every write it
makes (progress, heartbeat, the final state) goes through its `ProgressSink` and is conditional on that, so a
run that was given up on (its heartbeat went stale, the job was requeued and relaunched, or it was cancelled)
cannot write anything. It learns that it lost the row from its heartbeat and stops (`AttemptContext.cancelled`).

The adapter is verified with the adapter format's own check (`causalt2i.adapter_format.verify_adapter`, no
torch), published to the store, and registered in the same transaction that marks the job succeeded; if
that transaction loses, the published files are deleted again. So each job ends with at most one registered
adapter version, however often it was retried — two with `publish.compress`: a `full` tune is then compressed
into a LoRA adapter (`causalt2i.compress`, the code of `ct2i compress`) before anything is published, and both
versions are registered in that one transaction, the compressed one next after the full one (same name), its
ranks, retained energy and image fidelity in its manifest. The compression runs here, in the attempt's process,
not in the control plane's: it needs torch, the base model and a device, which is what the run's process has (a
Ray task holding the job's GPUs; `InlineRunner` is the one-box case where training, too, runs in-process),
while the control plane only schedules and serves the API. Under the Ray Train runner (`tune.runner`) this
process is the driver task, which holds no GPU: there the compression and its fidelity images run on the
driver node's CPU, slow at SDXL size (not measured here; lower `fidelity_steps` to shorten it). A
compression that fails fails the job: the spec asked for both versions.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select, update

from causalt2i.adapter_format import AdapterManifest, verify_adapter
from causalt2i.spec import TuningSpec
from cluster.config import ControlPlaneSettings
from cluster.db import Job, JobState
from cluster.progress_sink import ProgressSink
from cluster.registry import AdapterQuotaExceeded, new_adapter_id, register_adapter_version
from cluster.quotas import budget_spent_reason
from cluster.service import INPUTS, ControlPlane
from cluster.states import add_event, end_attempt, transition

if TYPE_CHECKING:
    from causalt2i.trainer import TrainResult


@dataclass(frozen=True)
class AttemptContext:
    """What a train function gets besides the spec and its folder. It pickles."""

    job_id: str
    tenant: str
    attempt: int
    settings: ControlPlaneSettings
    progress: ProgressSink

    def cancelled(self) -> bool:
        """True once the job was cancelled or this attempt lost its row: stop, leaving a checkpoint."""
        return self.progress.should_stop()

    @property
    def run_name(self) -> str:
        """`<tenant>--<job>`: a retried attempt finds the same run (and its checkpoints) under this name."""
        return f"{self.tenant}--{self.job_id}"


class TrainFn(Protocol):
    """Train `spec` in `run_dir` (resuming what is there), reporting through `ctx.progress` and stopping when
    `ctx.cancelled()`. Returns the trainer's result; `adapter_dir` is None when it stopped early."""

    def __call__(self, spec: TuningSpec, run_dir: Path, ctx: AttemptContext) -> "TrainResult": ...


class CompressFn(Protocol):
    """Compress the full adapter in `adapter_dir` into a LoRA adapter in `out_dir` as `spec.publish.compress` says;
    `spec` is resolved (its base a source this node can load)."""

    def __call__(self, spec: TuningSpec, adapter_dir: Path, out_dir: Path) -> None: ...


def local_compress_fn(spec: TuningSpec, adapter_dir: Path, out_dir: Path) -> None:
    """`causalt2i.compress.compress_adapter` in this process, on the base the tune ran on (fp32, on the run's device)."""
    from causalt2i.compress import FidelityConfig, compress_adapter
    from causalt2i.generation import Generator
    from causalt2i.models import load_sdxl
    from causalt2i.trainer import default_device

    options = spec.publish.compress
    generator = Generator(load_sdxl(spec.base_model, image_encoder=spec.image_encoder, vae=spec.vae, device=default_device()))
    compress_adapter(adapter_dir, out_dir, rank=options.rank, energy=options.energy, generator=generator,
                     fidelity=FidelityConfig(steps=options.fidelity_steps))


def local_train_fn(spec: TuningSpec, run_dir: Path, ctx: AttemptContext) -> "TrainResult":
    """The method-core trainer in this process, the attempt's sink as its callback; then, when the spec asks for it,
    the adapter's evaluation (`cluster.evaluation`), written beside it so that it is published with it."""
    from causalt2i.trainer import train
    from cluster.evaluation import evaluate_into

    result = train(spec, run_dir, resume=True, callbacks=[ctx.progress])
    if result.adapter_dir is not None and not result.stopped_early and spec.search is None:
        evaluate_into(spec, Path(result.adapter_dir), ctx.settings.metrics)
    return result


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    tenant: str
    attempt: int
    demand_gpus: float
    spec: TuningSpec


class Runner(Protocol):
    """How admitted jobs are launched. The scheduler holds the handles it returns, but never trusts them for
    outcomes: a run writes its own result to the database."""

    kind: str

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> Any: ...

    def poll(self, handle: Any) -> str | None:
        """None while the run is alive; "" once it returned; else a description of how it died."""

    def cancel(self, handle: Any, *, force: bool = False) -> None:
        """Ask the run to stop; `force` kills it (a run that ignored its cancelled row for `ENDING_GRACE_S`)."""

    def sweep(self, settings: ControlPlaneSettings, tracked: set[tuple[str, int]]) -> list[tuple[tuple[str, int], Any]]:
        """Runs of this control plane in flight that the scheduler holds no handle for, as `((job_id, attempt),
        handle)`: what a restarted scheduler adopts. A runner whose runs die with the scheduler returns []."""


def run_dir_for(plane: ControlPlane, tenant: str, job_id: str) -> Path:
    """Where the trainer checkpoints: inside a local store (so any node that mounts it can resume), else scratch."""
    if plane.store.is_local:
        return Path(plane.store.path(tenant, "jobs", job_id)) / "run"
    return plane.settings.work_dir / tenant / job_id / "run"


def _heartbeat_loop(sink: ProgressSink, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            sink.heartbeat()
        except Exception:  # a database blip: the next beat retries; the lease is several beats long
            pass


def checked_manifest(adapter_dir: Path, tenant: str, name: str) -> AdapterManifest:
    """The adapter's manifest, verified by the format's own check (schema, tensor sha256), and that it is this job's."""
    manifest = verify_adapter(adapter_dir)
    if (manifest.tenant, manifest.name) != (tenant, name):
        raise ValueError(f"manifest names {manifest.tenant}/{manifest.name}, the job is {tenant}/{name}")
    return manifest


def resolved_spec(settings: ControlPlaneSettings, spec: TuningSpec) -> TuningSpec:
    """The spec as it runs here: the catalog names of its base and image encoder replaced by their sources."""
    if spec.base_model not in settings.base_models:
        raise ValueError(f"base_model: {spec.base_model!r} is no longer offered here (offered: {', '.join(sorted(settings.base_models))})")
    update_fields: dict = {"base_model": settings.base_models[spec.base_model]}
    if spec.image_encoder is not None:
        if spec.image_encoder not in settings.image_encoders:
            raise ValueError(f"image_encoder: {spec.image_encoder!r} is no longer offered here")
        update_fields["image_encoder"] = settings.image_encoders[spec.image_encoder]
    return spec.model_copy(update=update_fields)


def execute_attempt(settings: ControlPlaneSettings, job_id: str, attempt: int, *, train_fn: TrainFn | None = None,
                    clock: Callable[[], float] = time.time) -> str:
    """Run attempt `attempt` of `job_id` to its end. Returns the state it left the job in ('fenced' if it never owned it)."""
    plane = ControlPlane.open(settings)
    with plane.db.write() as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        if job is None or not transition(session, job_id, expected=JobState.admitted, to=JobState.running, now=clock(),
                                         attempt=attempt, message=f"attempt {attempt} started"):
            return "fenced"
        tenant, spec = job.tenant, TuningSpec.model_validate_json(job.spec_json)
    sink = ProgressSink(settings, job_id, tenant, attempt, unit=spec.progress_unit, clock=clock)
    ctx = AttemptContext(job_id=job_id, tenant=tenant, attempt=attempt, settings=settings, progress=sink)
    stop_beats = threading.Event()
    beats = threading.Thread(target=_heartbeat_loop, args=(sink, stop_beats, settings.scheduler.heartbeat_seconds), daemon=True)
    beats.start()
    try:
        return _train_and_publish(plane, ctx, spec, train_fn or local_train_fn, clock)
    finally:
        stop_beats.set()
        beats.join(5)
        _remove_if_deleted(plane, tenant, job_id)


def _remove_if_deleted(plane: ControlPlane, tenant: str, job_id: str) -> None:
    """A job deleted while this attempt ran: remove its folder again, with what the run wrote into it meanwhile (the
    checkpoint of its stop), so nothing of a deleted job stays in the store."""
    with plane.db.read() as session:
        if session.execute(select(Job.id).where(Job.id == job_id)).first() is not None:
            return
    plane.store.delete(tenant, "jobs", job_id)
    import shutil

    shutil.rmtree(plane.settings.work_dir / tenant / job_id, ignore_errors=True)


def _end(plane: ControlPlane, ctx: AttemptContext, to: JobState, clock, message: str = "", **fields) -> bool:
    with plane.db.write() as session:
        job = session.execute(select(Job).where(Job.id == ctx.job_id)).scalar_one_or_none()
        if job is None or job.attempts != ctx.attempt:  # deleted, or relaunched
            return False
        return end_attempt(session, job, to=to, now=clock(), half_life_s=plane.settings.scheduler.fair_share_half_life_s,
                           message=message, **fields)


def _train_and_publish(plane: ControlPlane, ctx: AttemptContext, spec: TuningSpec, train_fn: TrainFn, clock,
                       compress_fn: CompressFn = local_compress_fn) -> str:
    tenant, job_id = ctx.tenant, ctx.job_id
    run_dir = run_dir_for(plane, tenant, job_id)
    try:
        inputs = run_dir.parent / "inputs-verified"
        plane.store.fetch_dir(tenant, ("jobs", job_id, INPUTS), inputs)  # every file sha256-checked
        local = spec.model_copy(update={"subjects": [
            subject.model_copy(update={"images": [str(inputs / name) for name in subject.images]}) for subject in spec.subjects]})
        result = train_fn(resolved_spec(plane.settings, local), run_dir / "trainer", ctx)
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"
        _end(plane, ctx, JobState.failed, clock, message="training failed", error=detail[:4000])
        traceback.print_exc()
        return "failed"
    if result.stopped_early or result.adapter_dir is None:
        return _after_early_stop(plane, ctx, result, clock)

    adapter_dir = Path(result.adapter_dir)
    try:
        manifest = checked_manifest(adapter_dir, tenant, spec.name)
    except Exception as err:
        _end(plane, ctx, JobState.failed, clock, message="adapter failed verification", error=f"{type(err).__name__}: {err}")
        return "failed"
    compressed = None  # (directory, manifest) of the compressed version, when the spec asks for one
    if spec.publish.compress is not None and manifest.param_mode == "full":
        compressed_dir = run_dir / "compressed"
        shutil.rmtree(compressed_dir, ignore_errors=True)  # an earlier attempt's
        try:
            compress_fn(resolved_spec(plane.settings, spec), adapter_dir, compressed_dir)
            compressed = compressed_dir, checked_manifest(compressed_dir, tenant, spec.name)
        except Exception as err:
            _end(plane, ctx, JobState.failed, clock, message="compression failed", error=f"{type(err).__name__}: {err}"[:4000])
            traceback.print_exc()
            return "failed"
    adapter_id = new_adapter_id()
    published = plane.store.publish_dir(tenant, ("adapters", adapter_id), adapter_dir)
    weights = published.files.get("adapter.safetensors", {})
    ids = [adapter_id]
    if compressed is not None:
        compressed_id = new_adapter_id()
        ids.append(compressed_id)
        compressed_published = plane.store.publish_dir(tenant, ("adapters", compressed_id), compressed[0])
    try:
        with plane.db.write() as session:
            job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
            now = clock()
            if job.attempts != ctx.attempt or not end_attempt(
                    session, job, to=JobState.succeeded, now=now, half_life_s=plane.settings.scheduler.fair_share_half_life_s,
                    message=f"adapter {adapter_id} registered", adapter_id=adapter_id,
                    progress_step=spec.progress_total, progress_total=spec.progress_total, progress_eta_s=0.0):
                raise _LostRow
            # The registry names the base as the tenant did (its catalog name), never the server's path to it.
            record = manifest.model_copy(update={"base_model": spec.base_model})
            version = register_adapter_version(
                session, adapter_id=adapter_id, tenant=tenant, name=job.name, uri=published.uri,
                sha256=weights.get("sha256", ""), size_bytes=published.total_bytes, manifest=record, job_id=job_id, now=now)
            add_event(session, job_id=job_id, tenant=tenant, at=now, kind="log",
                      message=f"adapter {job.name} v{version} ({adapter_id})", data={"adapter_id": adapter_id, "version": version})
            if compressed is not None:
                small = compressed[1]
                record = small.model_copy(update={"base_model": spec.base_model})
                small_version = register_adapter_version(
                    session, adapter_id=compressed_id, tenant=tenant, name=job.name, uri=compressed_published.uri,
                    sha256=compressed_published.files.get("adapter.safetensors", {}).get("sha256", ""),
                    size_bytes=compressed_published.total_bytes, manifest=record, job_id=job_id, now=now)
                fidelity = small.compressed_from.fidelity if small.compressed_from is not None else None
                add_event(session, job_id=job_id, tenant=tenant, at=now, kind="log",
                          message=f"adapter {job.name} v{small_version} ({compressed_id}): v{version} compressed to LoRA, "
                                  f"{small.tensors_bytes} of {manifest.tensors_bytes} bytes"
                                  + ("" if fidelity is None else ", images identical" if fidelity.psnr_db is None
                                     else f", image PSNR {fidelity.psnr_db:.1f} dB"),
                          data={"adapter_id": compressed_id, "version": small_version, "compressed_from": adapter_id})
    except _LostRow:
        for published_id in ids:
            plane.store.delete(tenant, "adapters", published_id)
        return "fenced"
    except AdapterQuotaExceeded as err:
        for published_id in ids:
            plane.store.delete(tenant, "adapters", published_id)
        _end(plane, ctx, JobState.failed, clock, message="adapter quota exceeded", error=str(err))
        return "failed"
    return "succeeded"


def _after_early_stop(plane: ControlPlane, ctx: AttemptContext, result: "TrainResult", clock) -> str:
    """The run stopped before its end. If the tenant's GPU-hour budget is spent (whichever copy of the sink saw it,
    or the database says so now), the attempt ends `failed` with that reason; the trainer left its checkpoint.
    Otherwise it was cancelled, deleted or fenced off, and whoever ended the attempt already wrote the row."""
    with plane.db.read() as session:
        job = session.execute(select(Job).where(Job.id == ctx.job_id)).scalar_one_or_none()
        if job is None:  # deleted; execute_attempt removes its folder
            return "stopped"
        mine = job.state == JobState.running and job.attempts == ctx.attempt
        reason = ctx.progress.budget_spent or (budget_spent_reason(session, ctx.tenant, clock()) if mine else None)
    if mine and reason is not None:
        with plane.db.read() as session:
            checkpoint = session.execute(select(Job.checkpoint_step).where(Job.id == ctx.job_id)).scalar_one_or_none()
        kept = f"checkpoint at step {checkpoint}" if checkpoint is not None else "no checkpoint yet"
        if _end(plane, ctx, JobState.failed, clock, message="GPU-hour budget spent",
                error=f"{reason}; stopped at step {result.step} of {result.total_steps} ({kept})"):
            return "failed"
    return "stopped"


class _LostRow(Exception):
    pass


def _run_attempt_task(settings: ControlPlaneSettings, job_id: str, attempt: int, train_fn: TrainFn | None) -> str:
    return execute_attempt(settings, job_id, attempt, train_fn=train_fn)


LAUNCHER_NAME = "ct2i-attempt-launcher"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's own marker of the head node (ray._common.constants)


class _AttemptLauncher:
    """The owner of every attempt task of one Ray namespace: a detached actor, so a run outlives the scheduler that
    launched it (a Ray task dies with its owner, and a scheduler is killed, redeployed or restarted far more often
    than a training should be). A restarted scheduler finds its runs here by name (`RayTaskRunner.sweep`) and adopts
    them with no lost steps.

    Why not one detached actor per attempt: on this 2-core box a fresh one took 11.7 s to start, a task on a warm
    worker 0.01 s. Why one per namespace, not per scheduler: each actor costs a worker process and its start-up,
    and the run names are scoped by scheduler and database already (`RayTaskRunner.run_name`).
    """

    def __init__(self):
        self.runs: dict[str, Any] = {}  # run name -> the task's ObjectRef, while it runs

    def _prune(self) -> None:
        import ray

        if not self.runs:
            return
        names = list(self.runs)
        ready, _ = ray.wait([self.runs[name] for name in names], num_returns=len(names), timeout=0)
        done = {ref.hex() for ref in ready}
        # A scheduler that holds a run's ref borrowed it (`launch` returned it), so its result outlives the entry.
        for name in names:
            if self.runs[name].hex() in done:
                del self.runs[name]

    def launch(self, name: str, options: dict, settings: ControlPlaneSettings, job_id: str, attempt: int,
               train_fn: TrainFn | None, node_id: str | None) -> list:
        """Submit the run `name` unless it is in flight already (idempotent: a retried launch never runs it twice).
        Returns `[ref]`, a list so that Ray hands over the reference, not the result."""
        import ray

        self._prune()
        if name not in self.runs:
            placement = {}
            if node_id is not None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                # Hard: a soft affinity was seen spilling to another node under load (the launcher itself did, in the
                # node-loss fault run). Should that node be gone, so is its scheduler: this run fails at once, and the
                # successor launches the next attempt.
                placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
            self.runs[name] = ray.remote(_run_attempt_task).options(name=name, max_retries=0, **options, **placement).remote(
                settings, job_id, attempt, train_fn)
        return [self.runs[name]]

    def running(self, prefix: str) -> dict[str, list]:
        """The runs in flight whose names start with `prefix`, each as `[ref]`."""
        self._prune()
        return {name: [ref] for name, ref in self.runs.items() if name.startswith(prefix)}

    def end(self, name: str, force: bool = False) -> bool:
        """Cancel the run `name`; `force` kills its worker (a run that ignored its cancelled row)."""
        import ray

        ref = self.runs.get(name)
        if ref is None:
            return False
        try:
            ray.cancel(ref, force=force)
        except Exception:
            return False
        return True

    def end_all(self, prefix: str = "") -> int:
        """Force-end every run in flight under `prefix` (a test's teardown; an operator's clean slate)."""
        names = list(self.running(prefix))
        return sum(self.end(name, force=True) for name in names)


def find_launcher(namespace: str):
    """The namespace's launcher actor, or None: never created here (a scheduler that has launched nothing has
    nothing to adopt, and creating one costs a worker process)."""
    import ray

    try:
        return ray.get_actor(LAUNCHER_NAME, namespace=namespace)
    except ValueError:
        return None


def get_or_create_launcher(namespace: str):
    import ray

    launcher_class = ray.remote(num_cpus=0, max_concurrency=16, max_restarts=-1)(_AttemptLauncher)
    # On the head, by the resource Ray gives only the head: a launcher on a worker node would take every run with it
    # when that node dies. (A soft affinity to the creator's node, the head, was not enough: in the node-loss fault
    # run the launcher was placed on the worker node while the head was busy.)
    return launcher_class.options(name=LAUNCHER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
                                  resources={HEAD_NODE_RESOURCE: 0.001}).remote()


@dataclass
class AttemptHandle:
    """A run of `RayTaskRunner`: its name in the launcher and its task's ObjectRef (borrowed from the launcher)."""

    name: str
    namespace: str
    ref: Any


LAUNCHER_CALL_TIMEOUT_S = 60.0  # a launcher call is a dict lookup; this only bounds a launcher that is restarting


class RayTaskRunner:
    """Runs `execute_attempt` as one Ray task per attempt, owned by the namespace's `_AttemptLauncher` so that it
    survives the scheduler; `train_fn` defaults to the in-process trainer."""

    def __init__(self, train_fn: TrainFn | None = None, num_cpus: float = 1.0, hold_gpus: bool = True,
                 task_name: str = "ct2i-run", kind: str = "ray_task", beside_scheduler: bool = False):
        """`hold_gpus=False` (with `num_cpus=0`) when `train_fn` starts its own workers that hold the resources,
        as a Ray Train driver does. `beside_scheduler` runs each attempt task on the node of the process that
        launches it (the scheduler's: the head on KubeRay): a task that holds no resources would otherwise land
        on whichever node Ray's spread threshold picks, often a worker node full of training, whose loss then
        takes the run's driver with it instead of only its workers (which Ray Train restarts elsewhere)."""
        self.train_fn = train_fn
        self.num_cpus = num_cpus
        self.hold_gpus = hold_gpus
        self.task_name = task_name
        self.kind = kind
        self.beside_scheduler = beside_scheduler

    @staticmethod
    def scope(settings: ControlPlaneSettings) -> str:
        """The prefix of this control plane's run names: its scheduler's name and its database's, so that two platforms
        sharing one Ray namespace (two tests, a staging and a production database) never adopt each other's runs."""
        import hashlib

        database = hashlib.sha256(str(settings.database_url).encode()).hexdigest()[:10]
        return f"{settings.scheduler_name}@{database}:"

    def run_name(self, settings: ControlPlaneSettings, tenant: str, job_id: str, attempt: int) -> str:
        return f"{self.scope(settings)}{self.task_name}:{tenant}/{job_id}#{attempt}"

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> AttemptHandle:
        import ray

        has_gpus = self.hold_gpus and ray.cluster_resources().get("GPU", 0) > 0
        options = {"num_cpus": self.num_cpus, "num_gpus": request.spec.resources.gpus_per_worker if has_gpus else 0}
        node_id = ray.get_runtime_context().get_node_id() if self.beside_scheduler else None
        name = self.run_name(settings, request.tenant, request.job_id, request.attempt)
        launcher = get_or_create_launcher(settings.ray_namespace)
        [ref] = ray.get(launcher.launch.remote(name, options, settings, request.job_id, request.attempt, self.train_fn,
                                               node_id), timeout=LAUNCHER_CALL_TIMEOUT_S)
        return AttemptHandle(name=name, namespace=settings.ray_namespace, ref=ref)

    def poll(self, handle: AttemptHandle) -> str | None:
        import ray

        ready, _ = ray.wait([handle.ref], timeout=0)
        if not ready:
            return None
        try:
            ray.get(handle.ref)
            return ""
        except Exception as err:  # the worker died (OOM, node lost), the launcher died with it, or the task errored
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]

    def cancel(self, handle: AttemptHandle, *, force: bool = False) -> None:
        """Without `force`: the run stops itself within a heartbeat once its row is cancelled; this only speeds up
        one that has not started yet. With `force`: kill its worker (the scheduler's last resort, `ENDING_GRACE_S`)."""
        launcher = find_launcher(handle.namespace)
        if launcher is not None:
            launcher.end.remote(handle.name, force)  # not awaited: a tick never waits on a run

    def sweep(self, settings: ControlPlaneSettings, tracked: set[tuple[str, int]]) -> list[tuple[tuple[str, int], AttemptHandle]]:
        """This control plane's runs in flight that the scheduler holds no handle for (launched by a predecessor that
        was killed or restarted): `((job_id, attempt), handle)` each."""
        import ray

        launcher = find_launcher(settings.ray_namespace)
        if launcher is None:
            return []
        running = ray.get(launcher.running.remote(self.scope(settings)), timeout=LAUNCHER_CALL_TIMEOUT_S)
        found = []
        for name, [ref] in running.items():
            job_id, _, attempt = name.rsplit("/", 1)[1].rpartition("#")
            if attempt.isdigit() and (job_id, int(attempt)) not in tracked:
                found.append(((job_id, int(attempt)), AttemptHandle(name=name, namespace=settings.ray_namespace, ref=ref)))
        return found


@dataclass
class _InlineRun:
    thread: threading.Thread
    outcome: dict = field(default_factory=dict)


class InlineRunner:
    """Runs `execute_attempt` in a thread of this process: the scheduler's tests without Ray, and one-box use."""

    kind = "inline"

    def __init__(self, train_fn: TrainFn | None = None, clock: Callable[[], float] = time.time):
        self.train_fn = train_fn
        self.clock = clock

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> _InlineRun:
        run = _InlineRun(threading.Thread(daemon=True, name=f"ct2i-run-{request.job_id}", target=lambda: None))

        def body():
            try:
                run.outcome["state"] = execute_attempt(settings, request.job_id, request.attempt, train_fn=self.train_fn,
                                                       clock=self.clock)
            except BaseException as err:
                run.outcome["error"] = f"{type(err).__name__}: {err}"

        run.thread = threading.Thread(target=body, daemon=True, name=f"ct2i-run-{request.job_id}")
        run.thread.start()
        return run

    def poll(self, handle: _InlineRun) -> str | None:
        if handle.thread.is_alive():
            return None
        return handle.outcome.get("error", "")

    def cancel(self, handle: _InlineRun, *, force: bool = False) -> None:
        pass  # a thread cannot be killed; the run stops itself within a heartbeat once its row is cancelled

    def sweep(self, settings: ControlPlaneSettings, tracked: set[tuple[str, int]]) -> list:
        return []  # the runs are threads of this process: none outlives the scheduler that launched it
