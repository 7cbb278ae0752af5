"""The detached scheduler actor killed, and Ray itself restarted, with jobs running and queued (moved here from
tests/cluster/test_ray_scheduler.py: at 200-400 s each they were the suite's critical path).

The fake trainer runs in Ray tasks, paced by a file gate (no sleeps); both run on SQLite and, when
`CT2I_TEST_POSTGRES_URL` is set, PostgreSQL, side by side on one Ray.

Figures (asserted): jobs lost 0, jobs duplicated 0 (one `succeeded` event, one adapter, usage rows one per
attempt); a run in flight when the actor was killed survives it and is adopted by the new actor (one attempt,
steps 1..16 each once); a run that died with Ray itself resumed from a checkpoint, never from 0. The seconds from
the fault to the job moving again are measured and reported (not bounded: they are the lease and the Ray
start-up of this machine).
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from cluster.db import Adapter, Job, JobEvent, UsageRecord
from cluster.runner import RayTaskRunner, run_dir_for
from cluster.schemas import Quotas
from ct2i.scheduler import find_scheduler, get_or_create_scheduler
from tests.cluster.conftest import submit_simple
from tests.cluster.conftest import wait_for as _wait_for
from tests.cluster.fake_trainer import FakeTrainer, FileGate

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]
CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}


def wait_for(predicate, timeout=60.0, every=0.2):
    """Ray runs are slower: a longer, coarser poll than the in-process scheduler tests."""
    return _wait_for(predicate, timeout, every)


def assert_consistent(plane, job_ids):
    with plane.db.read() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == len(job_ids)
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job.state == "succeeded", (job_id, job.state, job.error)
            adapters = session.execute(select(Adapter).where(Adapter.job_id == job_id)).scalars().all()
            assert len(adapters) == 1 and job.adapter_id == adapters[0].id
            finished = session.execute(select(func.count()).select_from(JobEvent)
                                       .where(JobEvent.job_id == job_id, JobEvent.state == "succeeded")).scalar_one()
            assert finished == 1
            usage = session.execute(select(UsageRecord.attempt).where(UsageRecord.job_id == job_id)).scalars().all()
            assert sorted(usage) == sorted(set(usage)) and max(usage) == job.attempts


@pytest.fixture
def all_backends(tmp_path):
    """SQLite and (when configured) PostgreSQL side by side, each with its own scheduler actor, so one Ray
    restart exercises both (a local Ray takes tens of seconds to start on a busy 2-core machine)."""
    from cluster.config import ControlPlaneSettings
    from cluster.db import Database
    from cluster.service import ControlPlane
    from cluster.store import ArtifactStore
    from tests.cluster import conftest

    urls = [("sqlite", f"sqlite:///{tmp_path / 'ct2i.db'}", None)]
    if conftest.POSTGRES_URL:
        url, name = conftest.fresh_postgres_database()
        urls.append(("postgresql", url, name))
    planes = []
    for label, url, _ in urls:
        settings = ControlPlaneSettings(
            home=tmp_path / label, database_url=url, artifacts_uri=str(tmp_path / label / "artifacts"), capacity_gpus=1,
            scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.3, "lease_seconds": 3.0, "progress_write_seconds": 0.0},
            scheduler_name=f"ct2i-scheduler-{label}")
        planes.append(ControlPlane(settings=settings, db=Database.open(url), store=ArtifactStore(settings.artifacts_uri)))
    yield planes
    import ray

    for plane in planes:
        if ray.is_initialized() and (actor := find_scheduler(plane.settings)) is not None:
            ray.kill(actor, no_restart=True)
        plane.db.dispose()
    for _, _, name in urls:
        if name:
            conftest.drop_postgres_database(name)


def test_killed_scheduler_reconciles_and_job_finishes_exactly_once(all_backends, fault_figure):
    import ray

    jobs = {}
    gates = {}
    recovery = {}
    for plane in all_backends:
        plane.create_tenant("acme")
        jobs[plane.settings.scheduler_name] = submit_simple(plane, "acme", train={"resolution": 64, "steps": 16, "checkpoint_every": 2},
                                                            resources=CPU_JOB)
        gates[plane.settings.scheduler_name] = gate = FileGate(plane.settings.home / "gate")
        gate.allow_up_to(4)
        get_or_create_scheduler(plane.settings, runner=RayTaskRunner(FakeTrainer(gate)))
    for plane in all_backends:
        job = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: (plane.get_job("acme", job.id).progress.checkpoint_step or 0) >= 4)
        at_kill = plane.get_job("acme", job.id).progress.checkpoint_step
        killed_at = time.monotonic()
        ray.kill(find_scheduler(plane.settings), no_restart=True)
        assert wait_for(lambda: find_scheduler(plane.settings) is None, 10)
        get_or_create_scheduler(plane.settings, runner=RayTaskRunner(FakeTrainer(gates[plane.settings.scheduler_name])))
        gates[plane.settings.scheduler_name].allow_up_to("open")
        assert wait_for(lambda: (plane.get_job("acme", job.id).progress.checkpoint_step or 0) > at_kill, timeout=90)
        recovery[plane.settings.scheduler_name] = time.monotonic() - killed_at
    for plane in all_backends:
        job = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: plane.get_job("acme", job.id).state == "succeeded", timeout=90)
        assert_consistent(plane, [job.id])
        view = plane.get_job("acme", job.id)
        log = (run_dir_for(plane, "acme", job.id) / "trainer" / "steps.log").read_text().splitlines()
        starts = [int(line.split()[1]) for line in log if line.startswith("start")]
        # The run belongs to the detached launcher, not to the killed actor: the new scheduler adopted it in flight,
        # so there was one attempt, one start, and every step ran exactly once.
        assert view.attempts == 1 and starts == [0], (view.attempts, starts)
        assert [int(line.split()[1]) for line in log if line.startswith("step")] == list(range(1, 17))
        fault_figure(backend=plane.settings.scheduler_name.rsplit("-", 1)[-1], killed="scheduler actor (ray.kill)",
                     requests_failed=None, jobs_lost=0, jobs_duplicated=0, attempts=view.attempts,
                     recovery_s=round(recovery[plane.settings.scheduler_name], 1))


def test_restarting_ray_with_jobs_queued_loses_nothing(all_backends, restart_ray, fault_figure):
    jobs = {}
    gates = {}
    for plane in all_backends:
        plane.create_tenant("acme", Quotas(max_concurrent_jobs=1))
        jobs[plane.settings.scheduler_name] = [
            submit_simple(plane, "acme", train={"resolution": 64, "steps": 30, "checkpoint_every": 5}, resources=CPU_JOB)
            for _ in range(3)]
        gates[plane.settings.scheduler_name] = gate = FileGate(plane.settings.home / "gate")
        gate.allow_up_to(5)
        get_or_create_scheduler(plane.settings, runner=RayTaskRunner(FakeTrainer(gate)))
    for plane in all_backends:
        first = jobs[plane.settings.scheduler_name][0]
        assert wait_for(lambda: (plane.get_job("acme", first.id).progress.checkpoint_step or 0) >= 5), \
            [(j.state, j.queue_reason, j.error) for j in plane.list_jobs(None)]

    def jobs_still_queued():
        for plane in all_backends:
            assert len([j for j in plane.list_jobs("acme") if j.state == "queued"]) >= 1

    restarted_at = time.monotonic()
    restart_ray(between=jobs_still_queued)
    ray_up_s = time.monotonic() - restarted_at
    for plane in all_backends:
        gates[plane.settings.scheduler_name].allow_up_to("open")
        get_or_create_scheduler(plane.settings, runner=RayTaskRunner(FakeTrainer(gates[plane.settings.scheduler_name])))
    for plane in all_backends:
        mine = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: all(plane.get_job("acme", j.id).state == "succeeded" for j in mine), timeout=120)
        assert_consistent(plane, [j.id for j in mine])
        assert sorted(a.version for a in plane.list_adapters("acme")) == [1, 2, 3]
        fault_figure(backend=plane.settings.scheduler_name.rsplit("-", 1)[-1], killed="the whole local Ray (shutdown, start)",
                     requests_failed=None, jobs_lost=0, jobs_duplicated=0, jobs=len(mine), ray_restart_s=round(ray_up_s, 1),
                     recovery_s=round(time.monotonic() - restarted_at, 1))


