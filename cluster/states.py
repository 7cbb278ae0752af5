"""The job state machine, enforced in the database.

    queued → admitted → running → succeeded | failed | cancelled
    admitted → queued, running → queued   (the run vanished or its launch failed: retry, counted in `attempts`)
    queued | admitted → cancelled | failed

Every change is one conditional `UPDATE jobs SET state = :to WHERE id = :id AND state IN (:expected)
[AND attempts = :attempt]`: of two racing writers exactly one sees a row count of 1. `attempts` doubles
as a fencing token, so a runner left over from an earlier launch cannot write to a relaunched job.
A trigger (migration 0002) refuses illegal transitions even from raw SQL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from cluster.db import Job, JobEvent, JobState, Tenant

TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
ACTIVE = frozenset({JobState.admitted, JobState.running})
LEGAL: dict[str, frozenset[str]] = {
    JobState.queued: frozenset({JobState.admitted, JobState.cancelled, JobState.failed}),
    JobState.admitted: frozenset({JobState.running, JobState.queued, JobState.cancelled, JobState.failed}),
    JobState.running: frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.queued}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, source: str, target: str):
        super().__init__(f"illegal job state transition {source} → {target}")
        self.source = source
        self.target = target


def check_legal(sources: Iterable[str], target: str) -> None:
    for source in sources:
        if target not in LEGAL[source]:
            raise IllegalTransition(source, target)


def add_event(session: Session, *, job_id: str, tenant: str, at: float, kind: str, state: str | None = None,
              message: str = "", data: dict | None = None) -> None:
    session.execute(insert(JobEvent).values(job_id=job_id, tenant=tenant, at=at, kind=kind, state=state,
                                            message=message, data_json=json.dumps(data or {})))


def transition(session: Session, job_id: str, *, expected: str | Iterable[str], to: str, now: float,
               attempt: int | None = None, message: str = "", **fields) -> bool:
    """Move `job_id` from one of `expected` to `to`; False (and nothing written) if it was not in them."""
    sources = (expected,) if isinstance(expected, str) else tuple(expected)
    check_legal(sources, to)
    values: dict = {"state": to, "updated_at": now, **fields}
    if to == "admitted":
        values.update(attempts=Job.attempts + 1, admitted_at=now, heartbeat_at=now, queue_reason=None)
    elif to == "running":
        values.update(started_at=now, heartbeat_at=now)
    elif to == "queued":
        values.update(admitted_at=None, started_at=None, heartbeat_at=None)
    elif to in TERMINAL:
        values.update(finished_at=now, queue_reason=None)
    stmt = update(Job).where(Job.id == job_id, Job.state.in_(sources))
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    result = session.execute(stmt.values(**values).returning(Job.tenant, Job.attempts))
    row = result.first()
    if row is None:
        return False
    add_event(session, job_id=job_id, tenant=row.tenant, at=now, kind="state", state=to, message=message,
              data={"attempt": row.attempts, **({"error": fields["error"]} if fields.get("error") else {})})
    return True


def admit_many(session: Session, job_ids: list[str], *, now: float, message: str = "admitted") -> list:
    """queued → admitted for a batch, in one conditional UPDATE: returns (id, tenant, attempts, spec_json) of the
    jobs that moved; a job cancelled meanwhile is simply not among them."""
    check_legal(("queued",), "admitted")
    if not job_ids:
        return []
    rows = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.state == "queued")
        .values(state="admitted", updated_at=now, attempts=Job.attempts + 1, admitted_at=now, heartbeat_at=now, queue_reason=None)
        .returning(Job.id, Job.tenant, Job.attempts, Job.spec_json)
        .execution_options(synchronize_session=False)).all()
    if rows:
        session.execute(insert(JobEvent), [
            {"job_id": r.id, "tenant": r.tenant, "at": now, "kind": "state", "state": "admitted", "message": message,
             "data_json": json.dumps({"attempt": r.attempts})} for r in rows])
    return rows


def decayed(value: float, since: float, now: float, half_life_s: float) -> float:
    if now <= since:
        return value
    return value * math.pow(0.5, (now - since) / half_life_s)


def record_usage(session: Session, *, tenant: str, job_id: str, attempt: int, gpus: float, started_at: float,
                 ended_at: float, half_life_s: float) -> bool:
    """Charge one ended attempt's GPU-seconds: its ledger row (kept current while it ran, see `cluster.quotas`) gets the
    final figure, and the tenant's decayed fair-share usage gets the attempt once (the caller ends each attempt once)."""
    from cluster.quotas import charge_attempt

    gpu_seconds = charge_attempt(session, tenant=tenant, job_id=job_id, attempt=attempt, gpus=gpus,
                                 started_at=started_at, until=ended_at)
    row = session.execute(select(Tenant.decayed_usage_gpu_s, Tenant.decayed_usage_at).where(Tenant.name == tenant)).one()
    session.execute(update(Tenant).where(Tenant.name == tenant).values(
        decayed_usage_gpu_s=decayed(row.decayed_usage_gpu_s, row.decayed_usage_at, ended_at, half_life_s) + gpu_seconds,
        decayed_usage_at=max(ended_at, row.decayed_usage_at)))
    return True


def end_attempt(session: Session, job: Job, *, to: str, now: float, half_life_s: float, message: str = "",
                **fields) -> bool:
    """End the current attempt of an admitted/running `job` (as loaded) and charge its GPU time."""
    sources = tuple(s for s in ("admitted", "running") if to in LEGAL[s])
    ok = transition(session, job.id, expected=sources, to=to, now=now, attempt=job.attempts,
                    message=message, **fields)
    if ok and job.started_at is not None:
        end = now if to != "queued" or job.heartbeat_at is None else max(job.heartbeat_at, job.started_at)
        record_usage(session, tenant=job.tenant, job_id=job.id, attempt=job.attempts, gpus=job.demand_gpus,
                     started_at=job.started_at, ended_at=end, half_life_s=half_life_s)
    return ok
