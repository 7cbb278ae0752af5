"""The scheduler: reconcile runs with the database, then admit queued jobs by fair share; as a detached Ray actor.

All state lives in the database, so the actor holds nothing that cannot be rebuilt. When it starts (first
time, after `ray.kill`, after the Ray head restarted) it finds admitted/running jobs it holds no handle for
and adopts them: a run whose heartbeat is fresh is still alive (it will write its own result); one whose
heartbeat is older than `lease_seconds` has vanished, so its attempt ends (charged up to the last beat)
and the job goes back to the queue, where the next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update

from cluster.admission import AdmissionPolicy, FairShareQueue, QueuedJob, TenantState
from cluster.config import ControlPlaneSettings
from cluster.db import Job, Tenant, UsageRecord
from cluster.runner import LaunchRequest, RayTaskRunner, Runner
from cluster.service import THIRTY_DAYS_S, ControlPlane
from cluster.states import ACTIVE, admit_many, decayed, end_attempt, transition

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: ControlPlaneSettings, runner: Runner, *, clock: Callable[[], float] = time.time,
                 capacity_gpus: float | None = None):
        self.settings = settings
        self.runner = runner
        self.clock = clock
        self.plane = ControlPlane.open(settings)
        self.db = self.plane.db
        self._capacity = capacity_gpus or settings.capacity_gpus
        self.handles: dict[tuple[str, int], Any] = {}
        self.blocked_since: dict[str, float] = {}
        self.lock = threading.Lock()
        self.policy = AdmissionPolicy(min_charge_s=settings.min_charge_s, starvation_after_s=settings.starvation_after_s)

    def capacity_gpus(self) -> float:
        """The configured GPU count, else the Ray cluster's GPUs, else its CPUs (a CPU cluster runs CPU jobs)."""
        if self._capacity:
            return self._capacity
        import ray

        resources = ray.cluster_resources()
        return float(resources.get("GPU") or resources.get("CPU") or 1.0)

    def tick(self) -> dict:
        with self.lock:
            now = self.clock()
            lost = self.reconcile(now)
            admitted = self.admit(now)
            delivered = 0
            try:
                from cluster.webhooks import deliver_due

                delivered = deliver_due(self.plane, now=self.clock())
            except Exception:
                log.exception("webhook delivery failed")
            return {"requeued_or_failed": lost, "admitted": admitted, "webhooks_delivered": delivered}

    # -- reconciliation ------------------------------------------------------------------------------

    def reconcile(self, now: float) -> int:
        with self.db.read() as session:
            active = session.execute(select(Job).where(Job.state.in_(ACTIVE))).scalars().all()
        active_keys = {(job.id, job.attempts) for job in active}
        for key in [k for k in self.handles if k not in active_keys]:  # cancelled, or finished and written
            handle = self.handles.pop(key)
            if self.runner.poll(handle) is None:
                self.runner.cancel(handle)
        ended = 0
        for job in active:
            key = (job.id, job.attempts)
            death = None
            if key in self.handles:
                outcome = self.runner.poll(self.handles[key])
                if outcome is None:
                    continue
                del self.handles[key]
                # The run returned but left its row active: it died between its last write and the end.
                death = outcome or "the run ended without recording a result"
            else:
                beat = job.heartbeat_at or job.admitted_at or 0.0
                if now - beat <= self.settings.lease_seconds:
                    continue  # adopted: alive, it writes its own result
                death = f"no heartbeat for {now - beat:.0f} s"
            ended += self._retry_or_fail(job, death, now)
        return ended

    def _retry_or_fail(self, job: Job, death: str, now: float) -> int:
        with self.db.write() as session:
            if job.attempts >= job.max_attempts:
                ok = end_attempt(session, job, to="failed", now=now, half_life_s=self.settings.fair_share_half_life_s,
                                 message=f"attempt {job.attempts} lost: {death}",
                                 error=f"gave up after {job.attempts} attempts; last: {death}")
            else:
                ok = end_attempt(session, job, to="queued", now=now, half_life_s=self.settings.fair_share_half_life_s,
                                 message=f"attempt {job.attempts} lost ({death}); requeued to resume from its last checkpoint")
        return int(ok)

    # -- admission -----------------------------------------------------------------------------------

    def build_queue(self, session, now: float) -> tuple[FairShareQueue, float]:
        tenants = {t.name: t for t in session.execute(select(Tenant)).scalars()}
        active = session.execute(select(Job.tenant, Job.demand_gpus, Job.started_at).where(Job.state.in_(ACTIVE))).all()
        used = dict(session.execute(select(UsageRecord.tenant, func.sum(UsageRecord.gpu_seconds))
                                    .where(UsageRecord.ended_at >= now - THIRTY_DAYS_S).group_by(UsageRecord.tenant)).all())
        states = {
            name: TenantState(name=name, weight=t.weight, max_concurrent_jobs=t.max_concurrent_jobs,
                              max_concurrent_gpus=t.max_concurrent_gpus, gpu_hours_per_30d=t.gpu_hours_per_30d,
                              recent_gpu_s=decayed(t.decayed_usage_gpu_s, t.decayed_usage_at, now, self.settings.fair_share_half_life_s),
                              used_30d_gpu_s=float(used.get(name) or 0.0))
            for name, t in tenants.items()
        }
        in_use = 0.0
        for tenant, demand, started_at in active:
            state = states[tenant]
            elapsed = max(0.0, now - started_at) if started_at is not None else 0.0
            state.running_jobs += 1
            state.running_gpus += demand
            state.recent_gpu_s += demand * max(elapsed, self.policy.min_charge_s)
            state.used_30d_gpu_s += demand * elapsed
            in_use += demand
        queue = FairShareQueue(self.policy, blocked_since=self.blocked_since)
        for state in states.values():
            queue.set_tenant(state)
        queued = session.execute(select(Job.id, Job.tenant, Job.demand_gpus, Job.created_at)
                                 .where(Job.state == "queued").order_by(Job.created_at, Job.id)).all()
        for row in queued:
            queue.push(QueuedJob(id=row.id, tenant=row.tenant, demand_gpus=row.demand_gpus, enqueued_at=row.created_at))
        live = {row.id for row in queued}
        for job_id in [j for j in self.blocked_since if j not in live]:
            del self.blocked_since[job_id]
        return queue, self.capacity_gpus() - in_use

    def admit(self, now: float) -> int:
        capacity = self.capacity_gpus()
        with self.db.read() as session:
            queue, free = self.build_queue(session, now)
        decision = queue.decide(free, capacity, now)
        if decision.reasons:
            with self.db.write() as session:
                for job_id, reason in decision.reasons.items():
                    session.execute(update(Job).where(Job.id == job_id, Job.state == "queued",
                                                      func.coalesce(Job.queue_reason, "") != reason).values(queue_reason=reason))
        # One transaction for the whole batch; each admission is still its own conditional UPDATE.
        to_launch: list[tuple[QueuedJob, int, dict]] = []
        if decision.admitted:
            by_id = {job.id: job for job in decision.admitted}
            with self.db.write() as session:
                moved = admit_many(session, list(by_id), now=now)
            to_launch = [(by_id[row.id], row.attempts, json.loads(row.spec_json)) for row in moved]
            order = {job_id: n for n, job_id in enumerate(by_id)}
            to_launch.sort(key=lambda item: order[item[0].id])
        launched = 0
        for job, attempt, spec in to_launch:
            request = LaunchRequest(job_id=job.id, tenant=job.tenant, attempt=attempt, demand_gpus=job.demand_gpus,
                                    gpus_per_worker=float(spec.get("resources", {}).get("gpus_per_worker", 1.0)))
            try:
                self.handles[(job.id, attempt)] = self.runner.launch(self.settings, request)
                launched += 1
            except Exception as err:
                log.exception("launch of %s failed", job.id)
                with self.db.write() as session:
                    transition(session, job.id, expected="admitted", to="queued", now=self.clock(), attempt=attempt,
                               message=f"launch failed: {type(err).__name__}: {err}")
        return launched


# -- the Ray actor -----------------------------------------------------------------------------------

class _SchedulerActor:
    """The detached, named actor around `Scheduler`: a tick loop in a thread, plus `wake()` to tick sooner."""

    def __init__(self, settings_json: dict, runner: Runner):
        self.scheduler = Scheduler(ControlPlaneSettings(**settings_json), runner)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ticks = 0
        self._last_error: str | None = None
        self.scheduler.tick()  # reconcile before anyone is told we are up
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ct2i-scheduler")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.scheduler.settings.tick_seconds)
            self._wake.clear()
            try:
                self.scheduler.tick()
                self._ticks += 1
                self._last_error = None
            except Exception as err:  # a database outage must not kill the loop
                self._last_error = f"{type(err).__name__}: {err}"
                log.exception("scheduler tick failed")

    def ping(self) -> str:
        return "ok"

    def wake(self) -> None:
        self._wake.set()

    def tick_now(self) -> dict:
        return self.scheduler.tick()

    def status(self) -> dict:
        return {"ticks": self._ticks, "handles": len(self.scheduler.handles), "last_error": self._last_error,
                "capacity_gpus": self.scheduler.capacity_gpus()}


def get_or_create_scheduler(settings: ControlPlaneSettings | None = None, runner: Runner | None = None):
    """The scheduler actor of this Ray cluster, created if missing. Needs `ray.init()` (or RAY_ADDRESS) first.

    Any driver finds the same actor by name: a Ray job, Serve, or the CLI. `runner` only matters when the
    actor is created.
    """
    import ray

    settings = settings or ControlPlaneSettings.from_env()
    actor_class = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1)(_SchedulerActor)
    handle = actor_class.options(name=settings.scheduler_name, namespace=settings.ray_namespace, lifetime="detached",
                                 get_if_exists=True).remote(settings.model_dump(mode="json"), runner or RayTaskRunner())
    ray.get(handle.ping.remote())
    return handle


def find_scheduler(settings: ControlPlaneSettings | None = None):
    """The running scheduler actor, or None (no Ray connection, or none created yet)."""
    import ray

    if not ray.is_initialized():
        return None
    settings = settings or ControlPlaneSettings.from_env()
    try:
        return ray.get_actor(settings.scheduler_name, namespace=settings.ray_namespace)
    except ValueError:
        return None
