"""The scheduler against a real database, with runs in threads (InlineRunner): quotas, retries, reconciliation."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, select, update

from cluster.db import Adapter, Job, UsageRecord
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from tests.cluster.conftest import submit_simple
from tests.cluster.conftest import wait_for
from tests.cluster.fake_trainer import FakeTrainer




def run_until_idle(scheduler: Scheduler, plane, timeout=20.0):
    def idle():
        scheduler.tick()
        return all(j.state in ("succeeded", "failed", "cancelled") for j in plane.list_jobs(None))
    assert wait_for(idle, timeout)


def _scheduler(settings, plane, runner=None, capacity=4):
    settings = settings.model_copy(update={"heartbeat_seconds": 0.2, "lease_seconds": 2.0, "progress_write_seconds": 0.0})
    return Scheduler(settings, runner or InlineRunner(FakeTrainer()), capacity_gpus=capacity)


def test_job_runs_to_a_registered_adapter_with_usage(settings, plane):
    from cluster.schemas import Quotas

    plane.create_tenant("acme", Quotas(max_concurrent_jobs=2))
    first = submit_simple(plane, "acme")
    second = submit_simple(plane, "acme")
    scheduler = _scheduler(settings, plane)
    run_until_idle(scheduler, plane)
    jobs = {j.id: plane.get_job("acme", j.id) for j in (first, second)}
    assert {j.state for j in jobs.values()} == {"succeeded"}
    adapters = plane.list_adapters("acme")
    assert sorted(a.version for a in adapters) == [1, 2] and {a.name for a in adapters} == {"pets"}
    assert {a.job_id for a in adapters} == set(jobs)
    assert jobs[first.id].progress.step == 4 and jobs[first.id].progress.total_steps == 4
    with plane.db.read() as session:
        usage = session.execute(select(UsageRecord)).scalars().all()
    assert sorted(u.job_id for u in usage) == sorted(jobs)
    # The registered adapter is readable and verified through the store.
    data = plane.adapter_file("acme", adapters[0].id, "adapter.safetensors")
    assert data.startswith(b"weights of acme/pets")


def test_tenant_at_concurrency_limit_stays_queued_while_another_runs(settings, plane):
    from cluster.schemas import Quotas

    plane.create_tenant("busy", Quotas(max_concurrent_jobs=1))
    plane.create_tenant("other", Quotas(max_concurrent_jobs=1))
    blocker = submit_simple(plane, "busy")
    waiting = submit_simple(plane, "busy")
    other = submit_simple(plane, "other")
    scheduler = _scheduler(settings, plane, runner=InlineRunner(FakeTrainer(step_seconds=0.5)))
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("other", other.id).state == "running")
    assert plane.get_job("busy", blocker.id).state in ("admitted", "running")
    job = plane.get_job("busy", waiting.id)
    assert job.state == "queued"
    assert job.queue_reason == "tenant at its concurrency limit: 1 of 1 jobs running"
    run_until_idle(scheduler, plane, timeout=30)
    assert plane.get_job("busy", waiting.id).state == "succeeded"


def test_tenant_over_gpu_hour_budget_is_not_admitted_with_reason(settings, plane):
    from cluster.schemas import Quotas

    plane.create_tenant("spent", Quotas(gpu_hours_per_30d=1.0))
    with plane.db.write() as session:
        now = time.time()
        session.execute(insert(UsageRecord).values(tenant="spent", job_id="job-old", attempt=1, gpu_seconds=3700.0,
                                                   started_at=now - 4000, ended_at=now - 300))
    job = submit_simple(plane, "spent")
    scheduler = _scheduler(settings, plane)
    scheduler.tick()
    view = plane.get_job("spent", job.id)
    assert view.state == "queued"
    assert view.queue_reason == "tenant over its GPU-hour budget: used 1.03 of 1 GPU-hours in the last 30 days"
    plane.set_quota("spent", Quotas(gpu_hours_per_30d=5.0))
    run_until_idle(scheduler, plane)
    assert plane.get_job("spent", job.id).state == "succeeded"


def test_training_error_fails_the_job_with_the_error(settings, plane):
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme")
    run_until_idle(_scheduler(settings, plane, runner=InlineRunner(FakeTrainer(fail_with="loss is NaN at step 3"))), plane)
    view = plane.get_job("acme", job.id)
    assert (view.state, view.error) == ("failed", "RuntimeError: loss is NaN at step 3")
    assert plane.list_adapters("acme") == []


def test_vanished_run_is_requeued_and_resumes_from_checkpoint(settings, plane):
    """A scheduler restart: the old one admitted and started a run that then died; the new one reconciles."""
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 6, "checkpoint_every": 2})
    now = time.time()
    with plane.db.write() as session:  # as the dead run left it: attempt 1, checkpoint at step 4, beat long ago
        from cluster.states import transition

        transition(session, job.id, expected="queued", to="admitted", now=now - 100)
        transition(session, job.id, expected="admitted", to="running", now=now - 90, attempt=1)
        session.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=now - 60, checkpoint_step=4))
    from cluster.runner import run_dir_for

    trainer_dir = run_dir_for(plane, "acme", job.id) / "trainer"
    trainer_dir.mkdir(parents=True)
    (trainer_dir / "ckpt.json").write_text('{"step": 4}')
    run_until_idle(_scheduler(settings, plane), plane)
    view = plane.get_job("acme", job.id)
    assert (view.state, view.attempts) == ("succeeded", 2)
    assert (trainer_dir / "steps.log").read_text().splitlines()[0].startswith("start 4 ")
    with plane.db.read() as session:
        usage = {u.attempt: u.gpu_seconds for u in session.execute(select(UsageRecord)).scalars()}
        adapters = session.execute(select(Adapter).where(Adapter.job_id == job.id)).scalars().all()
    assert set(usage) == {1, 2} and usage[1] == pytest.approx(30.0, abs=1.0)  # charged to the last heartbeat
    assert len(adapters) == 1


def test_job_that_keeps_vanishing_fails_after_max_attempts(settings, plane):
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme")
    with plane.db.write() as session:
        session.execute(update(Job).where(Job.id == job.id).values(max_attempts=1))
        from cluster.states import transition

        transition(session, job.id, expected="queued", to="admitted", now=time.time() - 100)
    scheduler = _scheduler(settings, plane)
    scheduler.reconcile(time.time())
    view = plane.get_job("acme", job.id)
    assert view.state == "failed" and view.error.startswith("gave up after 1 attempts")


def test_cancel_stops_the_run_and_frees_capacity(settings, plane):
    plane.create_tenant("acme")
    long_job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 200})
    scheduler = _scheduler(settings, plane, runner=InlineRunner(FakeTrainer(step_seconds=0.05)), capacity=1)
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("acme", long_job.id).progress.step >= 2)
    next_job = submit_simple(plane, "acme")
    scheduler.tick()
    assert plane.get_job("acme", next_job.id).state == "queued"
    plane.cancel_job("acme", long_job.id)
    run_until_idle(scheduler, plane)
    assert plane.get_job("acme", long_job.id).state == "cancelled"
    assert plane.get_job("acme", next_job.id).state == "succeeded"
    assert [a.job_id for a in plane.list_adapters("acme")] == [next_job.id]
    from cluster.runner import run_dir_for

    log = (run_dir_for(plane, "acme", long_job.id) / "trainer" / "steps.log").read_text()
    assert int(log.strip().splitlines()[-1].split()[1]) < 200  # the run stopped itself
