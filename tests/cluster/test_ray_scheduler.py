"""The detached scheduler actor on a local Ray: restarts of the actor and of Ray itself lose and duplicate nothing."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from cluster.db import Adapter, Job, JobEvent, UsageRecord
from cluster.runner import RayTaskRunner, run_dir_for
from cluster.scheduler import find_scheduler, get_or_create_scheduler
from cluster.schemas import Quotas
from tests.cluster.conftest import submit_simple
from tests.cluster.conftest import wait_for as _wait_for
from tests.cluster.fake_trainer import FakeTrainer
from tests.cluster.ray_support import start_local_ray, stop_local_ray

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray()
    yield
    stop_local_ray()


@pytest.fixture
def ray_settings(settings):
    return settings.model_copy(update={"capacity_gpus": 2, "tick_seconds": 0.2, "heartbeat_seconds": 0.3,
                                       "lease_seconds": 3.0, "progress_write_seconds": 0.0})


@pytest.fixture
def kill_scheduler_after(ray_settings):
    yield
    import ray

    actor = find_scheduler(ray_settings)
    if actor is not None:
        ray.kill(actor, no_restart=True)


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


def test_any_driver_finds_the_same_named_actor(ray_settings, plane, kill_scheduler_after):
    actor = get_or_create_scheduler(ray_settings, RayTaskRunner(FakeTrainer()))
    again = get_or_create_scheduler(ray_settings)
    import ray

    assert actor._actor_id == again._actor_id == find_scheduler(ray_settings)._actor_id
    assert ray.get(actor.status.remote())["capacity_gpus"] == 2


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
        url, name = conftest._fresh_postgres_database()
        urls.append(("postgresql", url, name))
    planes = []
    for label, url, _ in urls:
        settings = ControlPlaneSettings(
            home=tmp_path / label, database_url=url, artifacts_uri=str(tmp_path / label / "artifacts"), capacity_gpus=1,
            tick_seconds=0.2, heartbeat_seconds=0.3, lease_seconds=3.0, progress_write_seconds=0.0,
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
            conftest._drop_postgres_database(name)


def test_killed_scheduler_reconciles_and_job_finishes_exactly_once(all_backends):
    import ray

    jobs = {}
    for plane in all_backends:
        plane.create_tenant("acme")
        jobs[plane.settings.scheduler_name] = submit_simple(plane, "acme", train={"resolution": 64, "steps": 16, "checkpoint_every": 2})
        get_or_create_scheduler(plane.settings, RayTaskRunner(FakeTrainer(step_seconds=0.4)))
    for plane in all_backends:
        job = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: (plane.get_job("acme", job.id).progress.checkpoint_step or 0) >= 4)
        ray.kill(find_scheduler(plane.settings), no_restart=True)
        assert wait_for(lambda: find_scheduler(plane.settings) is None, 10)
        get_or_create_scheduler(plane.settings, RayTaskRunner(FakeTrainer(step_seconds=0.4)))
    for plane in all_backends:
        job = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: plane.get_job("acme", job.id).state == "succeeded", timeout=90)
        assert_consistent(plane, [job.id])
        view = plane.get_job("acme", job.id)
        log = (run_dir_for(plane, "acme", job.id) / "trainer" / "steps.log").read_text().splitlines()
        starts = [int(line.split()[1]) for line in log if line.startswith("start")]
        assert starts[0] == 0 and len(starts) == view.attempts
        # If the run died with its owner, the retry resumed from a checkpoint instead of step 0.
        assert all(start >= 4 for start in starts[1:])


def test_restarting_ray_with_jobs_queued_loses_nothing(all_backends):
    jobs = {}
    for plane in all_backends:
        plane.create_tenant("acme", Quotas(max_concurrent_jobs=1))
        jobs[plane.settings.scheduler_name] = [
            submit_simple(plane, "acme", train={"resolution": 64, "steps": 30, "checkpoint_every": 5}) for _ in range(3)]
        get_or_create_scheduler(plane.settings, RayTaskRunner(FakeTrainer(step_seconds=0.2)))
    for plane in all_backends:
        first = jobs[plane.settings.scheduler_name][0]
        assert wait_for(lambda: plane.get_job("acme", first.id).state in ("running", "succeeded")), [(j.state, j.queue_reason, j.error) for j in plane.list_jobs(None)]
    stop_local_ray()
    for plane in all_backends:
        assert len([j for j in plane.list_jobs("acme") if j.state == "queued"]) >= 1
    start_local_ray()
    for plane in all_backends:
        get_or_create_scheduler(plane.settings, RayTaskRunner(FakeTrainer(step_seconds=0.2)))
    for plane in all_backends:
        mine = jobs[plane.settings.scheduler_name]
        assert wait_for(lambda: all(plane.get_job("acme", j.id).state == "succeeded" for j in mine), timeout=120)
        assert_consistent(plane, [j.id for j in mine])
        assert sorted(a.version for a in plane.list_adapters("acme")) == [1, 2, 3]


def test_ct2i_submit_tiny_preset_end_to_end(tmp_path, monkeypatch, capsys):
    """`ct2i submit --wait` with the real method-core trainer on the tiny preset (SQLite; the PostgreSQL path of
    the same code is covered by the restart tests above)."""
    import json

    import ray

    from causalt2i.data.synthetic import write_synthetic_spec
    from cluster import cli_admin
    from cluster.config import ControlPlaneSettings

    monkeypatch.setenv("CT2I_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CT2I_DATABASE_URL", raising=False)
    monkeypatch.delenv("CT2I_ARTIFACTS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec_path = write_synthetic_spec(tmp_path / "spec", tenant="demo", name="e2e", resolution=64, steps=4,
                                     n_subjects=2, images_per_subject=2, size=64, gpus_per_worker=0)
    assert cli_admin.main(["tenants", "create", "demo"]) == 0
    try:
        code = cli_admin.main(["submit", str(spec_path), "--wait", "--json", "--poll-seconds", "0.5"])
        out, err = capsys.readouterr()
        assert code == 0, err
        job = json.loads(out[out.index("{"):])
        assert job["state"] == "succeeded" and job["progress"]["step"] == 4 and job["attempts"] == 1
        assert cli_admin.main(["adapters", "list", "--json"]) == 0
        adapters = json.loads(capsys.readouterr().out)
        assert [(a["name"], a["version"], a["job_id"]) for a in adapters] == [("e2e", 1, job["id"])]
        assert adapters[0]["base_model"] == "tiny" and len(adapters[0]["sha256"]) == 64
        from cluster.service import ControlPlane

        plane = ControlPlane.open(ControlPlaneSettings.from_env())
        assert plane.usage("demo").gpu_seconds_30d > 0
        from causalt2i.adapter import verify_adapter

        local = tmp_path / "fetched"
        plane.store.fetch_dir("demo", plane.store.parse_uri(adapters[0]["uri"], "demo"), local)
        assert verify_adapter(local).name == "e2e"
    finally:
        actor = find_scheduler(ControlPlaneSettings.from_env())
        if actor is not None:
            ray.kill(actor, no_restart=True)
