"""The scheduler: reconcile runs with the database, then admit queued jobs by fair share; and `SchedulerLoop`, the
body of the detached Ray actor that `ct2i.scheduler` starts with the runner its settings name.

All state lives in the database, so the actor holds nothing that cannot be rebuilt. When it starts (first
time, after `ray.kill`, after the Ray head restarted) it finds admitted/running jobs it holds no handle for
and adopts them. First it asks the runner for runs still in flight (`Runner.sweep`: `RayTaskRunner`'s runs belong
to a detached launcher actor, not to the scheduler, so they survive it) and holds them again as if it had launched
them: a training survives a scheduler restart with no lost step. It sweeps again every `lease_seconds`, so a run
whose job was requeued or cancelled behind its back is found and ended. A job with no run found whose heartbeat is
fresh is still alive (it will write its own result); one whose heartbeat is older than `lease_seconds` has
vanished, so its attempt ends (charged up to the last beat) and the job goes back to the queue, where the next
attempt resumes from the last checkpoint.

A run whose job is no longer active at its attempt (cancelled, deleted, requeued) is asked to stop and kept in
`ending` until it has; one still going `ENDING_GRACE_S` later (it ignores its cancelled row: a hung data loader, a
stuck collective) is killed, so a cancel always frees its GPUs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update

from cluster.admission import AdmissionPolicy, FairShareQueue, QueuedJob, TenantState
from cluster.config import ControlPlaneSettings
from cluster.db import Job, Tenant, UsageRecord
from causalt2i.spec import TuningSpec
from cluster.quotas import budget_gpu_seconds, budget_spent_message, used_gpu_seconds
from cluster.runner import LaunchRequest, Runner
from cluster.service import THIRTY_DAYS_S, ControlPlane
from cluster.db import JobState
from cluster.states import ACTIVE, admit_many, decayed, end_attempt, transition

log = logging.getLogger(__name__)
ENDING_GRACE_S = 60.0  # a run stops itself within a heartbeat of its cancel; one that has not by then is killed


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
        # Runs asked to stop, until they have: key -> (handle, first asked at, killed).
        self.ending: dict[tuple[str, int], tuple[Any, float, bool]] = {}
        self._swept_at = float("-inf")
        self.blocked_since: dict[str, float] = {}
        self.over_budget_since: dict[tuple[str, int], float] = {}  # running attempts whose tenant's budget is spent
        self.lock = threading.Lock()
        timing = settings.scheduler
        self.policy = AdmissionPolicy(min_charge_s=timing.min_charge_s, starvation_after_s=timing.starvation_after_s)
        from cluster.webhooks import WebhookDispatcher

        # Owned here, not a separate actor: the scheduler process is the one long-lived driver that already holds
        # the database; delivery is I/O-bound (threads suffice) and restarts with the actor from the DB outbox.
        self.webhooks = WebhookDispatcher(self.plane)  # started on the first tick

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
        # The state changes above wrote their events to the outbox (job_events) in their own transactions; the
        # dispatcher's workers deliver them. The tick never waits on a tenant's network: it only wakes them.
        self.webhooks.start().wake()
        return {"requeued_or_failed": lost, "admitted": admitted, "webhooks_delivered": self.webhooks.delivered}

    def close(self) -> None:
        """Stop the webhook workers, waiting for attempts in flight (each ends by its deadline; one cut short by a
        crash is retried after its lease)."""
        self.webhooks.close(timeout=self.settings.webhooks.timeout_s + 1.0)

    # -- reconciliation ------------------------------------------------------------------------------

    def reconcile(self, now: float) -> int:
        if now - self._swept_at >= self.settings.scheduler.lease_seconds:
            self._adopt_in_flight()
            self._swept_at = now
        with self.db.read() as session:
            active = session.execute(select(Job).where(Job.state.in_(ACTIVE))).scalars().all()
        active_keys = {(job.id, job.attempts) for job in active}
        for key in [k for k in self.handles if k not in active_keys]:  # cancelled, or finished and written
            handle = self.handles.pop(key)
            if self.runner.poll(handle) is None:
                self.runner.cancel(handle)
                self.ending[key] = (handle, now, False)
        self._settle_ending(now)
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
                if now - beat <= self.settings.scheduler.lease_seconds:
                    continue  # adopted: alive, it writes its own result
                death = f"no heartbeat for {now - beat:.0f} s"
            ended += self._retry_or_fail(job, death, now)
        return ended + self._stop_over_budget([job for job in active if job.state == JobState.running], now)

    def _adopt_in_flight(self) -> None:
        try:
            found = self.runner.sweep(self.settings, set(self.handles) | set(self.ending))
        except Exception:  # the launcher is restarting: the lease logic below stands in until the next sweep
            log.exception("sweeping the runner's runs failed")
            return
        for key, handle in found:
            log.info("adopted run %s#%d", *key)
            self.handles[key] = handle

    def _settle_ending(self, now: float) -> None:
        """Forget runs that stopped; kill one still running `ENDING_GRACE_S` after it was asked to stop, and forget it
        twice that long after (its worker is gone or unreachable; the launcher's own view is swept again)."""
        for key, (handle, since, killed) in list(self.ending.items()):
            if self.runner.poll(handle) is not None or now - since > 2 * ENDING_GRACE_S:
                del self.ending[key]
            elif not killed and now - since > ENDING_GRACE_S:
                log.warning("run %s#%d ignored its stop for %.0f s: killing it", *key, now - since)
                self.runner.cancel(handle, force=True)
                self.ending[key] = (handle, since, True)

    def _stop_over_budget(self, running: list[Job], now: float) -> int:
        """The GPU-hour budget's backstop. A run stops itself, with a checkpoint, once one of its writes finds the
        budget spent (`cluster.runner`); one still running `lease_seconds` after this scheduler first saw its tenant's
        budget spent is ended here."""
        over_since, self.over_budget_since = self.over_budget_since, {}
        if not running:
            return 0
        ended = 0
        with self.db.write() as session:
            for tenant in sorted({job.tenant for job in running}):
                budget_hours = session.execute(select(Tenant.gpu_hours_per_30d).where(Tenant.name == tenant)).scalar_one()
                used = used_gpu_seconds(session, tenant, now)
                if used < budget_gpu_seconds(budget_hours):
                    continue
                for job in (j for j in running if j.tenant == tenant):
                    key = (job.id, job.attempts)
                    self.over_budget_since[key] = since = over_since.get(key, now)
                    if now - since > self.settings.scheduler.lease_seconds:
                        ended += int(end_attempt(
                            session, job, to=JobState.failed, now=now, half_life_s=self.settings.scheduler.fair_share_half_life_s,
                            message="GPU-hour budget spent",
                            error=f"{budget_spent_message(used, budget_hours)}; stopped by the scheduler (the run did not stop itself)"))
        return ended

    def _retry_or_fail(self, job: Job, death: str, now: float) -> int:
        with self.db.write() as session:
            if job.attempts >= job.max_attempts:
                ok = end_attempt(session, job, to=JobState.failed, now=now, half_life_s=self.settings.scheduler.fair_share_half_life_s,
                                 message=f"attempt {job.attempts} lost: {death}",
                                 error=f"gave up after {job.attempts} attempts; last: {death}")
            else:
                ok = end_attempt(session, job, to=JobState.queued, now=now, half_life_s=self.settings.scheduler.fair_share_half_life_s,
                                 message=f"attempt {job.attempts} lost ({death}); requeued to resume from its last checkpoint")
        return int(ok)

    # -- admission -----------------------------------------------------------------------------------

    def build_queue(self, session, now: float) -> tuple[FairShareQueue, float]:
        tenants = {t.name: t for t in session.execute(select(Tenant)).scalars()}
        active = session.execute(select(Job.tenant, Job.demand_gpus, Job.started_at, Job.heartbeat_at)
                                 .where(Job.state.in_(ACTIVE))).all()
        used = dict(session.execute(select(UsageRecord.tenant, func.sum(UsageRecord.gpu_seconds))
                                    .where(UsageRecord.ended_at >= now - THIRTY_DAYS_S).group_by(UsageRecord.tenant)).all())
        states = {
            name: TenantState(name=name, weight=t.weight, max_concurrent_jobs=t.max_concurrent_jobs,
                              max_concurrent_gpus=t.max_concurrent_gpus, gpu_hours_per_30d=t.gpu_hours_per_30d,
                              recent_gpu_s=decayed(t.decayed_usage_gpu_s, t.decayed_usage_at, now, self.settings.scheduler.fair_share_half_life_s),
                              used_30d_gpu_s=float(used.get(name) or 0.0))
            for name, t in tenants.items()
        }
        in_use = 0.0
        for tenant, demand, started_at, heartbeat_at in active:
            state = states[tenant]
            elapsed = max(0.0, now - started_at) if started_at is not None else 0.0
            state.running_jobs += 1
            state.running_gpus += demand
            state.recent_gpu_s += demand * max(elapsed, self.policy.min_charge_s)
            # The ledger holds a running attempt's GPU time up to its last write (cluster.quotas); add the rest.
            charged_to = max(heartbeat_at or 0.0, started_at or 0.0)
            state.used_30d_gpu_s += demand * max(0.0, now - charged_to) if started_at is not None else 0.0
            in_use += demand
        queue = FairShareQueue(self.policy, blocked_since=self.blocked_since)
        for state in states.values():
            queue.set_tenant(state)
        queued = session.execute(select(Job.id, Job.tenant, Job.demand_gpus, Job.created_at)
                                 .where(Job.state == JobState.queued).order_by(Job.created_at, Job.id)).all()
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
                    session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.queued,
                                                      func.coalesce(Job.queue_reason, "") != reason).values(queue_reason=reason))
        # One transaction for the whole batch; each admission is still its own conditional UPDATE.
        to_launch: list[tuple[QueuedJob, int, TuningSpec]] = []
        if decision.admitted:
            by_id = {job.id: job for job in decision.admitted}
            with self.db.write() as session:
                moved = admit_many(session, list(by_id), now=now)
            to_launch = [(by_id[row.id], row.attempts, TuningSpec.model_validate_json(row.spec_json)) for row in moved]
            order = {job_id: n for n, job_id in enumerate(by_id)}
            to_launch.sort(key=lambda item: order[item[0].id])
        launched = 0
        for job, attempt, spec in to_launch:
            request = LaunchRequest(job_id=job.id, tenant=job.tenant, attempt=attempt, demand_gpus=job.demand_gpus, spec=spec)
            try:
                self.handles[(job.id, attempt)] = self.runner.launch(self.settings, request)
                launched += 1
            except Exception as err:
                log.exception("launch of %s failed", job.id)
                with self.db.write() as session:
                    transition(session, job.id, expected=JobState.admitted, to=JobState.queued, now=self.clock(), attempt=attempt,
                               message=f"launch failed: {type(err).__name__}: {err}")
        return launched


# -- the body of the Ray actor ----------------------------------------------------------------------

class SchedulerLoop:
    """A `Scheduler` ticking in a thread, plus `wake()` to tick sooner: what the detached actor runs.

    `ct2i.scheduler` wraps it in the named Ray actor with the runner `settings.scheduler.runner` names, so every
    driver that finds or starts the actor gets the same one, whoever came first.
    """

    def __init__(self, settings: ControlPlaneSettings, runner: Runner):
        self.scheduler = Scheduler(settings, runner)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ticks = 0
        self._last_error: str | None = None
        self.scheduler.tick()  # reconcile before anyone is told we are up
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ct2i-scheduler")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.scheduler.settings.scheduler.tick_seconds)
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
        return {"ticks": self._ticks, "handles": len(self.scheduler.handles), "ending": len(self.scheduler.ending),
                "last_error": self._last_error,
                "capacity_gpus": self.scheduler.capacity_gpus(), "runner": self.scheduler.runner.kind,
                "webhooks": {"delivered": self.scheduler.webhooks.delivered, "in_flight": sorted(self.scheduler.webhooks.in_flight()),
                             "last_error": self.scheduler.webhooks.last_error}}

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.scheduler.close()


def find_scheduler(settings: ControlPlaneSettings | None = None):
    """The running scheduler actor, or None (no Ray connection, or none started yet)."""
    import ray

    if not ray.is_initialized():
        return None
    settings = settings or ControlPlaneSettings()
    try:
        return ray.get_actor(settings.scheduler_name, namespace=settings.ray_namespace)
    except ValueError:
        return None
