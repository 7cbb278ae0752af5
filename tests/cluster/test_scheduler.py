"""The scheduler against a real database, with runs in threads (InlineRunner): quotas, retries, reconciliation."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, select, update

from cluster.db import Adapter, Job, UsageRecord
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from causalt2i.adapter import load_adapter
from tests.cluster.conftest import submit_simple, wait_for, with_timing
from tests.cluster.fake_trainer import FAKE_FINGERPRINT, FakeTrainer, ThreadGate


def run_until_idle(scheduler: Scheduler, plane, timeout=20.0):
    def idle():
        scheduler.tick()
        return all(j.state in ("succeeded", "failed", "cancelled") for j in plane.list_jobs(None))
    assert wait_for(idle, timeout)


def _scheduler(settings, plane, runner=None, capacity=4):
    settings = with_timing(settings, heartbeat_seconds=0.2, lease_seconds=2.0, progress_write_seconds=0.0)
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
    # The registered adapter is readable and verified through the store, and the real loader accepts it.
    assert plane.adapter_file("acme", adapters[0].id, "adapter.safetensors")
    fetched = plane.store.path("acme", *plane.store.parse_uri(adapters[0].uri, "acme"))
    adapter = load_adapter(fetched)
    assert (adapter.manifest.tenant, adapter.manifest.name, adapter.manifest.base_fingerprint) == ("acme", "pets", FAKE_FINGERPRINT)
    assert adapter.manifest.tokens == ["<s1>"] and adapters[0].base_model == "tiny"


def test_tenant_at_concurrency_limit_stays_queued_while_another_runs(settings, plane):
    from cluster.schemas import Quotas

    plane.create_tenant("busy", Quotas(max_concurrent_jobs=1))
    plane.create_tenant("other", Quotas(max_concurrent_jobs=1))
    blocker = submit_simple(plane, "busy")
    waiting = submit_simple(plane, "busy")
    other = submit_simple(plane, "other")
    gate = ThreadGate()
    scheduler = _scheduler(settings, plane, runner=InlineRunner(FakeTrainer(gate)))
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("other", other.id).state == "running")
    assert plane.get_job("busy", blocker.id).state in ("admitted", "running")
    job = plane.get_job("busy", waiting.id)
    assert job.state == "queued"
    assert job.queue_reason == "tenant at its concurrency limit: 1 of 1 jobs running"
    gate.open()
    run_until_idle(scheduler, plane, timeout=30)
    assert plane.get_job("busy", waiting.id).state == "succeeded"


def test_tenant_over_gpu_hour_budget_is_not_admitted_with_reason(settings, plane):
    from cluster.schemas import Quotas

    plane.create_tenant("spent", Quotas(gpu_hours_per_30d=1.0))
    job = submit_simple(plane, "spent")  # queued while budget remained; spent (by other jobs) before it is admitted
    with plane.db.write() as session:
        now = time.time()
        session.execute(insert(UsageRecord).values(tenant="spent", job_id="job-old", attempt=1, gpu_seconds=3700.0,
                                                   started_at=now - 4000, ended_at=now - 300))
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
    gate = ThreadGate(allowed=2)
    scheduler = _scheduler(settings, plane, runner=InlineRunner(FakeTrainer(gate)), capacity=1)
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("acme", long_job.id).progress.step >= 2)
    next_job = submit_simple(plane, "acme")
    scheduler.tick()
    assert plane.get_job("acme", next_job.id).state == "queued"
    plane.cancel_job("acme", long_job.id)
    # The run learns of the cancel from its next heartbeat, while its step 3 waits at the gate: it stops there.
    assert wait_for(lambda: not any(run.thread.is_alive() for run in scheduler.handles.values()))
    gate.open()
    run_until_idle(scheduler, plane)
    assert plane.get_job("acme", long_job.id).state == "cancelled"
    assert plane.get_job("acme", next_job.id).state == "succeeded"
    assert [a.job_id for a in plane.list_adapters("acme")] == [next_job.id]
    from cluster.runner import run_dir_for

    log = (run_dir_for(plane, "acme", long_job.id) / "trainer" / "steps.log").read_text()
    assert log.strip().splitlines()[-1] == "step 2"  # the run stopped itself, at the gate of step 3


class _SearchLikeTrainer:
    """A TrainFn that reports as a search does, with its trials' own steps interleaved in every order: trials
    ending, a trial's step before and after the last trial ended, and a result that names the best trial's
    steps (as `tune.search.run_search` returns)."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def __call__(self, spec, run_dir, ctx):
        from causalt2i.callbacks import StepInfo
        from causalt2i.trainer import TrainResult

        sink, plane = ctx.progress, ctx.progress.plane

        def row():
            view = plane.get_job(ctx.tenant, ctx.job_id)
            return view.progress.step, view.progress.total_steps

        def trial_step(step):
            sink.on_step(StepInfo(step=step, total_steps=2, loss=0.5, terms={}, seconds_per_step=0.0, eta_seconds=0.0))

        self.seen.append(row())
        trial_step(1)
        trial_step(2)
        self.seen.append(row())
        sink.on_trials(1, 3, 0.4)
        self.seen.append(row())
        trial_step(2)
        sink.on_trials(3, 3, 0.3)
        trial_step(2)  # a straggling trial report after the last trial ended
        self.seen.append(row())
        result = FakeTrainer()(spec.model_copy(update={"search": None, "train": spec.train.model_copy(update={"steps": 2})}),
                               run_dir, _StepsIgnored(ctx))
        return TrainResult(adapter_dir=result.adapter_dir, step=2, total_steps=2, stopped_early=False)


class _StepsIgnored:
    """The fake trainer's view of the context, with its steps going nowhere (it stands in for the best trial)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.progress = ctx.progress

    def cancelled(self):
        return self._ctx.cancelled()


def test_a_search_reports_trials_not_trial_steps_whatever_the_order(settings, plane):
    """The job's progress of a search counts trials, from submit (0/3) to success (3/3): a trial's steps reach
    the row in no order, and the final write is the search's count, not the best trial's steps."""
    plane.create_tenant("acme")
    search = {"num_samples": 3, "max_concurrent": 1, "alpha_scale": {"loguniform": [0.1, 10.0]}}
    job = submit_simple(plane, "acme", search=search)
    assert (plane.get_job("acme", job.id).progress.total_steps) == 3
    trainer = _SearchLikeTrainer()
    run_until_idle(_scheduler(settings, plane, InlineRunner(trainer)), plane)
    done = plane.get_job("acme", job.id)
    assert done.state == "succeeded", done.error
    assert trainer.seen == [(0, 3), (0, 3), (1, 3), (3, 3)]
    assert (done.progress.step, done.progress.total_steps) == (3, 3)

