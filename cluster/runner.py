"""Running an admitted job: the `Runner` interface, the run body `execute_attempt`, and `RayTaskRunner`.

A run owns its job row only while `state = 'running' AND attempts = <its attempt>` holds: every write it
makes (progress, heartbeat, the final state) is conditional on that, so a run that was given up on (its
heartbeat went stale, the job was requeued and relaunched, or it was cancelled) cannot write anything.
It learns that it lost the row from its heartbeat and stops through the trainer's `should_stop`.

The adapter is published to the store first and registered in the same transaction that marks the job
succeeded; if that transaction loses, the published files are deleted again. So each job ends with at
most one registered adapter version, however often it was retried.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update

from causalt2i.spec import parse_spec
from cluster.config import ControlPlaneSettings
from cluster.db import Job
from cluster.registry import AdapterQuotaExceeded, new_adapter_id, register_adapter_version
from cluster.service import INPUTS, ControlPlane
from cluster.states import add_event, end_attempt, transition

TrainFn = Callable[..., Any]


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    tenant: str
    attempt: int
    demand_gpus: float
    gpus_per_worker: float


class Runner(Protocol):
    """How admitted jobs are launched. The scheduler holds the handles it returns, but never trusts them for
    outcomes: a run writes its own result to the database."""

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> Any: ...

    def poll(self, handle: Any) -> str | None:
        """None while the run is alive; "" once it returned; else a description of how it died."""

    def cancel(self, handle: Any) -> None: ...


def run_dir_for(plane: ControlPlane, tenant: str, job_id: str) -> Path:
    """Where the trainer checkpoints: inside a local store (so any node that mounts it can resume), else scratch."""
    if plane.store.is_local:
        return Path(plane.store.path(tenant, "jobs", job_id)) / "run"
    return plane.settings.work_dir / tenant / job_id / "run"


class _RunCallbacks:
    """Trainer callbacks that write progress into the job row, fenced by attempt."""

    def __init__(self, plane: ControlPlane, job_id: str, tenant: str, attempt: int):
        self.plane, self.job_id, self.tenant, self.attempt = plane, job_id, tenant, attempt
        self.lost = threading.Event()
        self._last_write = 0.0

    def _fenced_update(self, **values) -> bool:
        with self.plane.db.write() as session:
            result = session.execute(update(Job).where(Job.id == self.job_id, Job.state == "running",
                                                       Job.attempts == self.attempt).values(**values))
            if result.rowcount != 1:
                self.lost.set()
                return False
            return True

    def heartbeat(self) -> None:
        self._fenced_update(heartbeat_at=time.time())

    def on_step(self, info) -> None:
        now = time.time()
        last = info.step >= info.total_steps
        if not last and now - self._last_write < self.plane.settings.progress_write_seconds:
            return
        self._last_write = now
        self._fenced_update(progress_step=info.step, progress_total=info.total_steps, progress_loss=float(info.loss),
                            progress_eta_s=float(info.eta_seconds), heartbeat_at=now, updated_at=now,
                            progress_terms_json=json.dumps({k: float(v) for k, v in dict(info.terms).items()}))

    def on_checkpoint(self, step: int, path: Path) -> None:
        now = time.time()
        with self.plane.db.write() as session:
            result = session.execute(update(Job).where(Job.id == self.job_id, Job.state == "running",
                                                       Job.attempts == self.attempt).values(checkpoint_step=step, heartbeat_at=now))
            if result.rowcount == 1:
                add_event(session, job_id=self.job_id, tenant=self.tenant, at=now, kind="log",
                          message=f"checkpoint at step {step}", data={"step": step, "attempt": self.attempt})
            else:
                self.lost.set()

    def should_stop(self) -> bool:
        return self.lost.is_set()


def _heartbeat_loop(callbacks: _RunCallbacks, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            callbacks.heartbeat()
        except Exception:  # a database blip: the next beat retries; the lease is several beats long
            pass


def _read_adapter_manifest(adapter_dir: Path, tenant: str, name: str) -> dict:
    """The adapter's manifest, checked the way `causalt2i.adapter.verify_adapter` does (tensor sha256 against the
    manifest) but without importing torch into the control plane."""
    from causalt2i.atomic import sha256_file

    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    if not isinstance(manifest, dict) or not manifest.get("tensors_sha256"):
        raise ValueError("manifest.json has no tensors_sha256")
    if sha256_file(adapter_dir / "adapter.safetensors") != manifest["tensors_sha256"]:
        raise ValueError("adapter.safetensors does not match its manifest's tensors_sha256")
    if manifest.get("tenant", tenant) != tenant or manifest.get("name", name) != name:
        raise ValueError(f"manifest names {manifest.get('tenant')}/{manifest.get('name')}, the job is {tenant}/{name}")
    return manifest


def default_train_fn() -> TrainFn:
    from causalt2i.trainer import train

    return train


def execute_attempt(settings: ControlPlaneSettings, job_id: str, attempt: int, *, train_fn: TrainFn | None = None,
                    device: str | None = None) -> str:
    """Run attempt `attempt` of `job_id` to its end. Returns the state it left the job in ('fenced' if it never owned it)."""
    plane = ControlPlane.open(settings)
    with plane.db.write() as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        if job is None or not transition(session, job_id, expected="admitted", to="running", now=time.time(), attempt=attempt,
                                         message=f"attempt {attempt} started"):
            return "fenced"
        tenant, spec_data = job.tenant, json.loads(job.spec_json)
    callbacks = _RunCallbacks(plane, job_id, tenant, attempt)
    stop_beats = threading.Event()
    beats = threading.Thread(target=_heartbeat_loop, args=(callbacks, stop_beats, settings.heartbeat_seconds), daemon=True)
    beats.start()
    try:
        return _train_and_publish(plane, callbacks, spec_data, train_fn or default_train_fn(), device)
    finally:
        stop_beats.set()
        beats.join(5)


def _end(plane: ControlPlane, callbacks: _RunCallbacks, to: str, message: str = "", **fields) -> bool:
    with plane.db.write() as session:
        job = session.execute(select(Job).where(Job.id == callbacks.job_id)).scalar_one()
        if job.attempts != callbacks.attempt:
            return False
        return end_attempt(session, job, to=to, now=time.time(), half_life_s=plane.settings.fair_share_half_life_s,
                           message=message, **fields)


def _train_and_publish(plane: ControlPlane, callbacks: _RunCallbacks, spec_data: dict, train_fn: TrainFn,
                       device: str | None) -> str:
    tenant, job_id = callbacks.tenant, callbacks.job_id
    run_dir = run_dir_for(plane, tenant, job_id)
    try:
        inputs = run_dir.parent / "inputs-verified"
        plane.store.fetch_dir(tenant, ("jobs", job_id, INPUTS), inputs)
        for subject in spec_data["subjects"]:
            subject["images"] = [str(inputs / name) for name in subject["images"]]
        spec = parse_spec(spec_data, check_files=True)
        result = train_fn(spec, run_dir / "trainer", resume=True, callbacks=[callbacks], device=device)
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"
        _end(plane, callbacks, "failed", message="training failed", error=detail[:4000])
        traceback.print_exc()
        return "failed"
    if result.stopped_early or result.adapter_dir is None:
        return "stopped"  # cancelled or fenced off: whoever ended the attempt already wrote the row

    adapter_dir = Path(result.adapter_dir)
    try:
        manifest = _read_adapter_manifest(adapter_dir, tenant, spec.name)
    except Exception as err:
        _end(plane, callbacks, "failed", message="adapter failed verification", error=f"{type(err).__name__}: {err}")
        return "failed"
    adapter_id = new_adapter_id()
    published = plane.store.publish_dir(tenant, ("adapters", adapter_id), adapter_dir)
    weights = published.files.get("adapter.safetensors", {})
    try:
        with plane.db.write() as session:
            job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
            now = time.time()
            if job.attempts != callbacks.attempt or not end_attempt(
                    session, job, to="succeeded", now=now, half_life_s=plane.settings.fair_share_half_life_s,
                    message=f"adapter {adapter_id} registered", adapter_id=adapter_id,
                    progress_step=result.step, progress_total=result.total_steps, progress_eta_s=0.0):
                raise _LostRow
            version = register_adapter_version(
                session, adapter_id=adapter_id, tenant=tenant, name=job.name, uri=published.uri,
                sha256=weights.get("sha256", ""), size_bytes=published.total_bytes, manifest=manifest, job_id=job_id, now=now)
            add_event(session, job_id=job_id, tenant=tenant, at=now, kind="log",
                      message=f"adapter {job.name} v{version} ({adapter_id})", data={"adapter_id": adapter_id, "version": version})
    except _LostRow:
        plane.store.delete(tenant, "adapters", adapter_id)
        return "fenced"
    except AdapterQuotaExceeded as err:
        plane.store.delete(tenant, "adapters", adapter_id)
        _end(plane, callbacks, "failed", message="adapter quota exceeded", error=str(err))
        return "failed"
    return "succeeded"


class _LostRow(Exception):
    pass


def _run_attempt_task(settings_json: dict, job_id: str, attempt: int, train_fn: TrainFn | None) -> str:
    return execute_attempt(ControlPlaneSettings(**settings_json), job_id, attempt, train_fn=train_fn)


class RayTaskRunner:
    """Runs `execute_attempt` (the method-core trainer) as one Ray task per attempt."""

    def __init__(self, train_fn: TrainFn | None = None, num_cpus: float = 1.0, hold_gpus: bool = True,
                 task_name: str = "ct2i-run"):
        """`hold_gpus=False` (with `num_cpus=0`) when `train_fn` starts its own workers that hold the resources,
        as a Ray Train driver does."""
        self.train_fn = train_fn
        self.num_cpus = num_cpus
        self.hold_gpus = hold_gpus
        self.task_name = task_name

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> Any:
        import ray

        has_gpus = self.hold_gpus and ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_run_attempt_task).options(
            num_cpus=self.num_cpus, num_gpus=request.gpus_per_worker if has_gpus else 0, max_retries=0,
            name=f"{self.task_name}:{request.tenant}/{request.job_id}#{request.attempt}")
        return task.remote(settings.model_dump(mode="json"), request.job_id, request.attempt, self.train_fn)

    def poll(self, handle: Any) -> str | None:
        import ray

        ready, _ = ray.wait([handle], timeout=0)
        if not ready:
            return None
        try:
            ray.get(handle)
            return ""
        except Exception as err:  # the worker died (OOM, node lost) or the task errored outside training
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]

    def cancel(self, handle: Any) -> None:
        # The run stops itself within a heartbeat once its row is cancelled; this only speeds up a run that
        # has not started yet.
        import ray

        try:
            ray.cancel(handle, force=False)
        except Exception:
            pass


class InlineRunner:
    """Runs `execute_attempt` in a thread of this process: the scheduler's tests without Ray, and one-box use."""

    def __init__(self, train_fn: TrainFn | None = None):
        self.train_fn = train_fn

    def launch(self, settings: ControlPlaneSettings, request: LaunchRequest) -> Any:
        outcome: dict = {}

        def body():
            try:
                outcome["state"] = execute_attempt(settings, request.job_id, request.attempt, train_fn=self.train_fn)
            except BaseException as err:
                outcome["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=body, daemon=True, name=f"ct2i-run-{request.job_id}")
        thread.start()
        return thread, outcome

    def poll(self, handle: Any) -> str | None:
        thread, outcome = handle
        if thread.is_alive():
            return None
        return outcome.get("error", "")

    def cancel(self, handle: Any) -> None:
        pass
