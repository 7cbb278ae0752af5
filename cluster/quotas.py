"""GPU-hour and stored-bytes accounting: what a tenant has used, charged while its jobs run, and what it may still use.

GPU time. Each attempt of a job has one row in the usage ledger (unique job_id, attempt). The running attempt
keeps it current: every fenced write it makes (heartbeat, progress, checkpoint) sets the row to
`gpus × (now − started_at)` in the same transaction, so the ledger trails the truth by at most one heartbeat, and
the attempt's end sets the final figure. A tenant's use is the sum of its rows that ended (or were last charged)
in the last 30 days; in-flight attempts are in it.

Stored bytes. A job's inputs count from submit until it is cancelled or deleted; an adapter's files count while it
is `ready`. Checkpoints in a job's run folder are not counted (they are deleted with the job).
"""

from __future__ import annotations

import math

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cluster.db import Adapter, Job, JobState, Tenant, UsageRecord

THIRTY_DAYS_S = 30 * 24 * 3600.0
SECONDS_PER_HOUR = 3600.0


def charge_attempt(session: Session, *, tenant: str, job_id: str, attempt: int, gpus: float, started_at: float,
                   until: float) -> float:
    """Set the attempt's ledger row to `gpus × (until − started_at)`, never lowering it; returns the charge."""
    gpu_seconds = max(0.0, until - started_at) * gpus
    raised = (update(UsageRecord).where(UsageRecord.job_id == job_id, UsageRecord.attempt == attempt)
              .values(gpu_seconds=case((UsageRecord.gpu_seconds < gpu_seconds, gpu_seconds), else_=UsageRecord.gpu_seconds),
                      ended_at=case((UsageRecord.ended_at < until, until), else_=UsageRecord.ended_at)))
    if session.execute(raised).rowcount == 1:
        return gpu_seconds
    try:
        with session.begin_nested():
            session.execute(insert(UsageRecord).values(tenant=tenant, job_id=job_id, attempt=attempt, gpu_seconds=gpu_seconds,
                                                       started_at=started_at, ended_at=until))
    except IntegrityError:  # another copy of the attempt's sink inserted it meanwhile
        session.execute(raised)
    return gpu_seconds


def used_gpu_seconds(session: Session, tenant: str, now: float) -> float:
    return float(session.execute(select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0))
                                 .where(UsageRecord.tenant == tenant, UsageRecord.ended_at >= now - THIRTY_DAYS_S)).scalar_one())


def budget_gpu_seconds(gpu_hours_per_30d: float) -> float:
    return gpu_hours_per_30d * SECONDS_PER_HOUR if math.isfinite(gpu_hours_per_30d) else math.inf


def budget_spent_message(used_s: float, budget_hours: float) -> str:
    return (f"GPU-hour budget spent: used {used_s / SECONDS_PER_HOUR:.4g} of {budget_hours:g} GPU-hours "
            f"in the last 30 days")


def budget_spent_reason(session: Session, tenant: str, now: float) -> str | None:
    """Why `tenant` may use no more GPU time now (its 30-day budget is used up), or None."""
    budget_hours = session.execute(select(Tenant.gpu_hours_per_30d).where(Tenant.name == tenant)).scalar_one_or_none()
    if budget_hours is None:
        return None
    used = used_gpu_seconds(session, tenant, now)
    if used >= budget_gpu_seconds(budget_hours):
        return budget_spent_message(used, budget_hours)
    return None


def stored_input_bytes(session: Session, tenant: str) -> int:
    """Bytes of job inputs still kept: every job's but a cancelled one's (cancelling frees them; deleting removes the row)."""
    return int(session.execute(select(func.coalesce(func.sum(Job.input_bytes), 0))
                               .where(Job.tenant == tenant, Job.state != JobState.cancelled)).scalar_one())


def stored_adapter_bytes(session: Session, tenant: str) -> int:
    return int(session.execute(select(func.coalesce(func.sum(Adapter.bytes), 0))
                               .where(Adapter.tenant == tenant, Adapter.status == "ready")).scalar_one())


def lock_tenant(session: Session, tenant: str) -> Tenant | None:
    """The tenant's row, locked for the rest of the transaction: concurrent submits of one tenant take turns here.

    PostgreSQL: `SELECT ... FOR UPDATE`. SQLite ignores FOR UPDATE, but `Database.write()` begins with
    `BEGIN IMMEDIATE` there, which holds the database's write lock from the first statement on.
    """
    return session.execute(select(Tenant).where(Tenant.name == tenant).with_for_update()).scalar_one_or_none()
