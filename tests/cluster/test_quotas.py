"""Quotas that hold (issue 13, item 4): GPU time charged while a job runs and enforced during the run, refusals at
submit, stored bytes reserved atomically with the insert, and cancel/delete freeing what they should.

Runs are in threads (InlineRunner) on a fake clock that the trainer advances by a fixed number of seconds per step,
so GPU-seconds are exact; no Ray."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cluster.db import Job, UsageRecord
from cluster.runner import InlineRunner, run_dir_for
from cluster.scheduler import Scheduler
from cluster.schemas import Quotas
from cluster.service import InvalidInput, NotFound, QuotaExceeded
from tests.cluster.conftest import png_bytes, spec_dict, submit_simple, wait_for, with_timing
from tests.cluster.fake_trainer import FakeTrainer, ThreadGate

SECONDS_PER_STEP = 10.0


class FakeClock:
    def __init__(self):
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class ClockGate:
    """Each step takes SECONDS_PER_STEP on the fake clock; with `limit`, steps past it wait for `release`."""

    def __init__(self, clock: FakeClock, limit: ThreadGate | None = None):
        self.clock, self.limit = clock, limit

    def wait(self, step: int, stop) -> bool:
        if self.limit is not None and not self.limit.wait(step, stop):
            return False
        self.clock.advance(SECONDS_PER_STEP)
        return True


def _scheduler(settings, clock, trainer, capacity=4):
    settings = with_timing(settings, heartbeat_seconds=0.2, lease_seconds=2.0, progress_write_seconds=0.0)
    return Scheduler(settings, InlineRunner(trainer, clock=clock), clock=clock, capacity_gpus=capacity)


def _run_until_idle(scheduler, plane, timeout=30.0):
    def idle():
        scheduler.tick()
        return all(j.state in ("succeeded", "failed", "cancelled") for j in plane.list_jobs(None))
    assert wait_for(idle, timeout)


def _ledger(plane, job_id: str) -> float:
    with plane.db.read() as session:
        return sum(r.gpu_seconds for r in session.execute(select(UsageRecord).where(UsageRecord.job_id == job_id)).scalars())


# -- GPU time ---------------------------------------------------------------------------------------

def test_gpu_time_is_charged_while_the_job_runs(settings, plane):
    clock = FakeClock()
    plane.clock = clock
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 6})
    limit = ThreadGate(allowed=3)
    scheduler = _scheduler(settings, clock, FakeTrainer(ClockGate(clock, limit)))
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("acme", job.id).progress.step == 3)
    view = plane.get_job("acme", job.id)
    usage = plane.usage("acme")
    assert view.state == "running"
    # 3 steps of 10 s on 1 GPU, in the ledger before the job ends; the budget's remainder shrinks with it.
    assert usage.gpu_seconds_30d == pytest.approx(3 * SECONDS_PER_STEP)
    assert usage.gpu_seconds_remaining_30d == pytest.approx(100 * 3600 - 3 * SECONDS_PER_STEP)
    limit.open()
    _run_until_idle(scheduler, plane)
    assert plane.get_job("acme", job.id).state == "succeeded"
    assert _ledger(plane, job.id) == pytest.approx(6 * SECONDS_PER_STEP)  # the end sets the final figure once


@pytest.mark.parametrize("budget_hours, expect", [(0.01, "failed"), (1.0, "succeeded")])
def test_job_stops_at_the_budget_with_a_checkpoint_and_the_reason(settings, plane, budget_hours, expect):
    """0.01 GPU-hours = 36 GPU-s: the 20-step job (200 GPU-s) stops after step 4 (40 GPU-s), the first write that finds
    the budget spent, with a checkpoint at that step. The control with 1 GPU-hour runs to its end."""
    clock = FakeClock()
    plane.clock = clock
    plane.create_tenant("acme", Quotas(gpu_hours_per_30d=budget_hours))
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 20, "checkpoint_every": 3})
    _run_until_idle(_scheduler(settings, clock, FakeTrainer(ClockGate(clock))), plane)
    view = plane.get_job("acme", job.id)
    assert view.state == expect, view.error
    if expect == "succeeded":
        assert _ledger(plane, job.id) == pytest.approx(20 * SECONDS_PER_STEP)
        return
    assert view.error.startswith("GPU-hour budget spent: used 0.01111 of 0.01 GPU-hours in the last 30 days")
    assert "stopped at step 4 of 20 (checkpoint at step 4)" in view.error
    assert view.progress.checkpoint_step == 4 and view.progress.step == 4
    ckpt = run_dir_for(plane, "acme", job.id) / "trainer" / "ckpt.json"
    assert ckpt.read_text() == '{"step": 4}'
    # Overrun: less than one step's GPU time past the budget (a write charges every step here).
    assert 36.0 <= _ledger(plane, job.id) < 36.0 + SECONDS_PER_STEP
    assert plane.list_adapters("acme") == []
    # Spent now: the next submit is refused at once with the reason, not queued.
    with pytest.raises(QuotaExceeded) as refused:
        submit_simple(plane, "acme")
    assert refused.value.field == "tenant.gpu_hours_per_30d" and "GPU-hour budget spent" in refused.value.message


class _IgnoresStop:
    """A TrainFn that keeps beating and never looks at `ctx.cancelled()`: only the scheduler can stop it."""

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def __call__(self, spec, run_dir, ctx):
        from causalt2i.trainer import TrainResult

        while plane_state(ctx) == "running":
            self.clock.advance(SECONDS_PER_STEP)
            ctx.progress.heartbeat()
            time.sleep(0.02)
        return TrainResult(adapter_dir=None, step=0, total_steps=spec.total_steps, stopped_early=True)


def plane_state(ctx) -> str:
    return ctx.progress.plane.get_job(ctx.tenant, ctx.job_id).state


def test_scheduler_ends_a_run_that_does_not_stop_at_the_budget(settings, plane):
    clock = FakeClock()
    plane.clock = clock
    plane.create_tenant("acme", Quotas(gpu_hours_per_30d=0.01))
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 20})
    _run_until_idle(_scheduler(settings, clock, _IgnoresStop(clock)), plane)
    view = plane.get_job("acme", job.id)
    assert view.state == "failed"
    assert view.error.startswith("GPU-hour budget spent") and "stopped by the scheduler" in view.error
    # Without the backstop it would run (and be charged) forever; ended soon after the budget ran out.
    assert 36.0 <= _ledger(plane, job.id) < 36.0 + 30 * SECONDS_PER_STEP


def test_no_budget_is_refused_at_submit_with_the_reason(settings, plane):
    plane.create_tenant("broke", Quotas(gpu_hours_per_30d=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        submit_simple(plane, "broke")
    assert refused.value.status == 429 and refused.value.field == "tenant.gpu_hours_per_30d"
    assert refused.value.message.startswith("GPU-hour budget spent: used 0 of 0 GPU-hours")
    assert plane.list_jobs("broke") == []
    assert not Path(plane.store.path("broke", "jobs")).exists()  # refused before anything was stored


SEARCH = {"num_samples": 3, "alpha_scale": {"loguniform": [0.1, 10.0]}}


@pytest.mark.parametrize(("max_concurrent", "demand"), [(1, 1.0), (2, 2.0), (5, 3.0)])
def test_a_search_holds_one_runs_gpus_for_each_trial_it_runs_at_once(plane, max_concurrent, demand):
    """Admitted as one trial's worth, a search would run `max_concurrent` trials on it: the rest wait for workers
    and fail at the worker-start timeout (seen through `ct2i serve`, tests/ct2i/test_cli_serve.py)."""
    plane.create_tenant("acme", Quotas(max_concurrent_gpus=8))
    job = submit_simple(plane, "acme", search={**SEARCH, "max_concurrent": max_concurrent})
    assert job.demand_gpus == demand  # 1 GPU per trial, min(max_concurrent, num_samples) trials at once


def test_a_search_wider_than_the_tenants_gpus_is_refused_naming_max_concurrent(plane):
    plane.create_tenant("acme", Quotas(max_concurrent_gpus=1))
    with pytest.raises(InvalidInput) as refused:
        submit_simple(plane, "acme", search={**SEARCH, "max_concurrent": 2})
    assert refused.value.field == "spec.search.max_concurrent"
    assert "2 trials at once" in refused.value.message and "max_concurrent_gpus is 1" in refused.value.message
    assert plane.list_jobs("acme") == []
    assert submit_simple(plane, "acme", search={**SEARCH, "max_concurrent": 1}).demand_gpus == 1.0


def test_steps_that_cannot_fit_the_remaining_budget_are_refused(tmp_path, db_url):
    from cluster.store import ArtifactStore
    from cluster.service import ControlPlane
    from tests.cluster.conftest import test_settings

    settings = test_settings(tmp_path, db_url, limits={"max_images_per_job": 6, "max_image_bytes": 200_000,
                                                       "min_gpu_seconds_per_step": 1.0})
    plane = ControlPlane.open(settings)
    plane.store = ArtifactStore(settings.artifacts_uri)
    plane.create_tenant("acme", Quotas(gpu_hours_per_30d=0.01))  # 36 GPU-s: at 1 GPU-s per step, 36 steps fit
    with pytest.raises(QuotaExceeded) as refused:
        submit_simple(plane, "acme", train={"resolution": 64, "steps": 37})
    assert refused.value.field == "spec.train.steps"
    assert "need at least 37 GPU-seconds" in refused.value.message and "at most 36 steps fit" in refused.value.message
    assert submit_simple(plane, "acme", train={"resolution": 64, "steps": 36}).state == "queued"
    # The schema's own bound, whatever the budget.
    with pytest.raises(InvalidInput) as too_many:
        submit_simple(plane, "acme", train={"resolution": 64, "steps": 2**62})
    assert too_many.value.field == "spec.train.steps"


# -- stored bytes -----------------------------------------------------------------------------------

def test_ten_concurrent_submits_with_room_for_one_accept_exactly_one(plane):
    """Every submit passes the early check before any inserts (a barrier in the store's publish), so only the
    check under the tenant's lock in the inserting transaction can keep the other nine out."""
    image = png_bytes()
    plane.create_tenant("acme", Quotas(max_stored_bytes=len(image) * 3 // 2))
    barrier = threading.Barrier(10, timeout=60)
    publish = plane.store.publish_files

    def publish_after_all_checked(*args, **kwargs):
        barrier.wait()
        return publish(*args, **kwargs)

    plane.store.publish_files = publish_after_all_checked
    outcomes: list[object] = []

    def submit():
        try:
            outcomes.append(plane.submit("acme", spec_dict("acme"), {"a.png": image}))
        except Exception as err:
            outcomes.append(err)

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    accepted = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(accepted) == 1 and len(refused) == 9, refused
    assert all(isinstance(e, QuotaExceeded) and e.field == "tenant.max_stored_bytes" for e in refused)
    assert [j.id for j in plane.list_jobs("acme")] == [accepted[0].id]
    assert plane.usage("acme").stored_input_bytes == len(image)
    # The refused submits' files were removed again: only the accepted job's inputs are in the store.
    jobs_dir = Path(plane.store.path("acme", "jobs"))
    assert sorted(p.name for p in jobs_dir.iterdir()) == [accepted[0].id]


def test_cancel_frees_the_inputs_and_the_next_submit_fits(plane):
    image = png_bytes()
    plane.create_tenant("acme", Quotas(max_stored_bytes=len(image) * 3 // 2))
    first = submit_simple(plane, "acme")
    with pytest.raises(QuotaExceeded):
        submit_simple(plane, "acme")
    assert plane.cancel_job("acme", first.id).state == "cancelled"
    assert plane.usage("acme").stored_input_bytes == 0
    assert not plane.store.exists("acme", "jobs", first.id, "inputs")
    second = submit_simple(plane, "acme")
    assert plane.get_job("acme", first.id).state == "cancelled"  # the job and its history stay
    assert plane.usage("acme").stored_bytes == len(image) and second.state == "queued"


def test_delete_frees_inputs_and_artifacts_and_the_next_submit_succeeds(settings, plane):
    clock = FakeClock()
    plane.clock = clock
    plane.create_tenant("acme")
    kept = submit_simple(plane, "acme", name="kept")
    doomed = submit_simple(plane, "acme", name="doomed")
    _run_until_idle(_scheduler(settings, clock, FakeTrainer(ClockGate(clock))), plane)
    adapters = {a.job_id: a for a in plane.list_adapters("acme")}
    assert set(adapters) == {kept.id, doomed.id}
    before = plane.usage("acme")
    assert before.stored_adapter_bytes == adapters[kept.id].bytes + adapters[doomed.id].bytes > 0
    # Full: the quota is exactly what is stored now.
    plane.set_quota("acme", Quotas(max_stored_bytes=before.stored_bytes))
    with pytest.raises(QuotaExceeded):
        submit_simple(plane, "acme", name="next")

    deleted = plane.delete_job("acme", doomed.id)
    assert deleted.state == "succeeded" and deleted.deleted_adapters == [adapters[doomed.id].id]
    assert deleted.freed_adapter_bytes == adapters[doomed.id].bytes and deleted.freed_input_bytes == len(png_bytes())
    after = plane.usage("acme")
    assert after.stored_bytes == before.stored_bytes - deleted.freed_adapter_bytes - deleted.freed_input_bytes
    assert after.gpu_seconds_30d == pytest.approx(before.gpu_seconds_30d)  # GPU time used stays charged
    # Gone: the job, its store folder (inputs, checkpoints), its adapter, which is no longer listed or served.
    with pytest.raises(NotFound):
        plane.get_job("acme", doomed.id)
    with pytest.raises(NotFound):
        plane.resolve_adapter_for_use("acme", adapters[doomed.id].id)
    assert not plane.store.exists("acme", "adapters", adapters[doomed.id].id)
    assert not Path(plane.store.path("acme", "jobs", doomed.id)).exists()
    # Nothing else of the tenant's was lost.
    assert plane.get_job("acme", kept.id).state == "succeeded"
    assert [a.id for a in plane.list_adapters("acme")] == [adapters[kept.id].id]
    assert plane.adapter_file("acme", adapters[kept.id].id, "adapter.safetensors")
    assert plane.store.exists("acme", "jobs", kept.id, "inputs")
    # And the next submit fits.
    assert submit_simple(plane, "acme", name="next").state == "queued"


def test_deleting_a_running_job_cancels_it_and_its_run_cleans_up(settings, plane):
    clock = FakeClock()
    plane.clock = clock
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 50})
    limit = ThreadGate(allowed=2)
    scheduler = _scheduler(settings, clock, FakeTrainer(ClockGate(clock, limit)))
    scheduler.tick()
    assert wait_for(lambda: plane.get_job("acme", job.id).progress.step == 2)
    deleted = plane.delete_job("acme", job.id)
    assert deleted.state == "cancelled" and deleted.freed_input_bytes == len(png_bytes())
    # The run learns it lost its row at its next heartbeat, stops, and removes the folder it may have written to.
    assert wait_for(lambda: not any(run.thread.is_alive() for run in scheduler.handles.values()))
    assert not Path(plane.store.path("acme", "jobs", job.id)).exists()
    with plane.db.read() as session:
        assert session.execute(select(Job).where(Job.id == job.id)).first() is None
    assert _ledger(plane, job.id) == pytest.approx(2 * SECONDS_PER_STEP)  # charged, not refunded
    assert plane.usage("acme").stored_bytes == 0


def test_another_tenants_job_cannot_be_deleted(plane):
    plane.create_tenant("alice")
    plane.create_tenant("bob")
    job = submit_simple(plane, "bob")
    with pytest.raises(NotFound):
        plane.delete_job("alice", job.id)
    assert plane.get_job("bob", job.id).state == "queued"


@pytest.mark.parametrize("beat_age_s, admitted", [(100.0, True), (700.0, False)])
def test_admission_counts_a_running_attempt_once(settings, plane, beat_age_s, admitted):
    """The ledger holds a running attempt's GPU time up to its last heartbeat; admission adds only the rest. Budget
    3600 GPU-s, the running job charged 3000 up to a beat `beat_age_s` ago: 3100 leaves room for the next job,
    3700 does not. (Counting the whole elapsed time on top of the ledger would make both 6000+ and block both.)"""
    from sqlalchemy import insert, update

    from cluster.states import transition

    plane.create_tenant("acme", Quotas(gpu_hours_per_30d=1.0, max_concurrent_jobs=2))
    running = submit_simple(plane, "acme")
    waiting = submit_simple(plane, "acme")
    now = time.time()
    started = now - beat_age_s - 3000.0
    with plane.db.write() as session:
        transition(session, running.id, expected="queued", to="admitted", now=started)
        transition(session, running.id, expected="admitted", to="running", now=started, attempt=1)
        session.execute(update(Job).where(Job.id == running.id).values(heartbeat_at=now - beat_age_s))
        session.execute(insert(UsageRecord).values(tenant="acme", job_id=running.id, attempt=1, gpu_seconds=3000.0,
                                                   started_at=started, ended_at=now - beat_age_s))
    scheduler = Scheduler(with_timing(settings, lease_seconds=10_000.0), InlineRunner(FakeTrainer(ThreadGate())),
                          capacity_gpus=4, clock=lambda: now)
    with plane.db.read() as session:
        queue, _ = scheduler.build_queue(session, now)
    assert queue.tenant("acme").used_30d_gpu_s == pytest.approx(3000.0 + beat_age_s)
    decision = queue.decide(free_gpus=3, capacity_gpus=4, now=now)
    assert [j.id for j in decision.admitted] == ([waiting.id] if admitted else [])
    if not admitted:
        assert decision.reasons[waiting.id].startswith("tenant over its GPU-hour budget: used 1.03 of 1 GPU-hours")


def test_over_http_no_budget_is_429_and_usage_shows_what_counts(plane):
    import base64

    from fastapi.testclient import TestClient

    from cluster.api import create_app

    plane.create_tenant("broke", Quotas(gpu_hours_per_30d=0.0))
    plane.create_tenant("acme")
    keys = {name: plane.create_key("tenant", name).key for name in ("broke", "acme")}
    image = png_bytes()
    body = lambda tenant: {"spec": spec_dict(tenant), "images": {"a.png": base64.b64encode(image).decode()}}  # noqa: E731
    with TestClient(create_app(plane=plane, notify=lambda _: None)) as client:
        refused = client.post("/v1/tunings", json=body("broke"), headers={"Authorization": f"Bearer {keys['broke']}"})
        assert refused.status_code == 429 and "GPU-hour budget spent" in refused.text and "gpu_hours_per_30d" in refused.text
        acme = {"Authorization": f"Bearer {keys['acme']}"}
        job = client.post("/v1/tunings", json=body("acme"), headers=acme).json()
        usage = client.get("/v1/usage", headers=acme).json()
        assert (usage["stored_input_bytes"], usage["stored_adapter_bytes"], usage["stored_bytes"]) == (len(image), 0, len(image))
        assert usage["gpu_seconds_remaining_30d"] == pytest.approx(100 * 3600)
        assert client.post(f"/v1/tunings/{job['id']}/cancel", headers=acme).json()["state"] == "cancelled"
        assert client.get("/v1/usage", headers=acme).json()["stored_input_bytes"] == 0
        assert client.delete(f"/v1/tunings/{job['id']}", headers=acme).status_code == 200
        assert client.get(f"/v1/tunings/{job['id']}", headers=acme).status_code == 404
