"""Attempt runs owned by the detached launcher (`cluster.runner._AttemptLauncher`), not by the scheduler that
launched them: a new scheduler adopts a run in flight (no lost step, no second attempt), a launch is idempotent,
a cancelled run that ignores its stop is killed after `ENDING_GRACE_S`, and a scheduler never sees the runs of a
control plane with another database. On the session's Ray; the scheduler actor killed for real is the fault run
tests/faults/test_scheduler_restarts.py."""

from __future__ import annotations

import os
import time

import pytest

from cluster.config import ControlPlaneSettings
from cluster.db import Database
from cluster.runner import LaunchRequest, RayTaskRunner, run_dir_for
from cluster.scheduler import ENDING_GRACE_S, Scheduler
from cluster.service import ControlPlane
from cluster.store import ArtifactStore
from tests.cluster.conftest import submit_simple, wait_for
from tests.cluster.fake_trainer import FakeTrainer, FileGate, StubbornTrainer

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("ray_cluster")]
CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}


def sqlite_plane(tmp_path, label: str) -> ControlPlane:
    settings = ControlPlaneSettings(
        home=tmp_path / label, database_url=f"sqlite:///{tmp_path / label}.db", artifacts_uri=str(tmp_path / label / "artifacts"),
        capacity_gpus=1, scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.3, "lease_seconds": 3.0,
                                    "progress_write_seconds": 0.0})
    return ControlPlane(settings=settings, db=Database.open(settings.database_url), store=ArtifactStore(settings.artifacts_uri))


def tick_until(scheduler, predicate, timeout=120.0) -> bool:
    def ticked():
        scheduler.tick()
        return predicate()

    return wait_for(ticked, timeout, every=0.2)


def test_a_new_scheduler_adopts_the_run_in_flight_with_no_lost_step(tmp_path):
    plane = sqlite_plane(tmp_path, "adopt")
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 8, "checkpoint_every": 4}, resources=CPU_JOB)
    gate = FileGate(tmp_path / "gate")
    gate.allow_up_to(3)
    runner = RayTaskRunner(FakeTrainer(gate))
    first = Scheduler(plane.settings, runner)
    assert tick_until(first, lambda: plane.get_job("acme", job.id).progress.step == 3), plane.get_job("acme", job.id)
    key = (job.id, 1)
    launched = first.handles[key]
    # Launching the same attempt again (a retried launch call) hands back the run in flight, never a second one.
    spec = plane.get_job("acme", job.id).spec
    again = runner.launch(plane.settings, LaunchRequest(job_id=job.id, tenant="acme", attempt=1, demand_gpus=0, spec=spec))
    assert again.ref.hex() == launched.ref.hex()

    # The first scheduler is gone (its process killed, its handles with it); the run is not.
    second = Scheduler(plane.settings, RayTaskRunner(FakeTrainer(gate)))
    second.tick()
    assert key in second.handles and second.runner.poll(second.handles[key]) is None
    gate.allow_up_to("open")
    assert tick_until(second, lambda: plane.get_job("acme", job.id).state == "succeeded")
    view = plane.get_job("acme", job.id)
    assert view.attempts == 1
    log = (run_dir_for(plane, "acme", job.id) / "trainer" / "steps.log").read_text().splitlines()
    assert [line for line in log if line.startswith("start")] == [log[0]] and log[0].startswith("start 0 ")
    assert [int(line.split()[1]) for line in log if line.startswith("step")] == list(range(1, 9))
    plane.db.dispose()


def test_a_cancelled_run_that_ignores_its_stop_is_killed_after_the_grace(tmp_path):
    plane = sqlite_plane(tmp_path, "stubborn")
    other = sqlite_plane(tmp_path, "other-database")  # the same scheduler name, another control plane
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 8}, resources=CPU_JOB)
    runner = RayTaskRunner(StubbornTrainer())
    launcher_side = Scheduler(plane.settings, runner)
    pid_file = run_dir_for(plane, "acme", job.id) / "trainer" / "pid"
    assert tick_until(launcher_side, pid_file.exists)
    pid = int(pid_file.read_text())
    assert runner.sweep(other.settings, set()) == []
    assert [key for key, _ in runner.sweep(plane.settings, set())] == [(job.id, 1)]

    # Cancelled while no scheduler holds the run: the next scheduler's sweep finds it and asks it to stop.
    plane.cancel_job("acme", job.id)
    offset = [0.0]
    scheduler = Scheduler(plane.settings, runner, clock=lambda: time.time() + offset[0])
    scheduler.tick()
    assert list(scheduler.ending) == [(job.id, 1)] and not scheduler.ending[(job.id, 1)][2]
    time.sleep(2.0)
    scheduler.tick()
    os.kill(pid, 0)  # it ignored the stop: still running within the grace
    offset[0] = ENDING_GRACE_S + 1.0
    scheduler.tick()
    assert scheduler.ending[(job.id, 1)][2]  # killed

    def gone() -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True

    assert wait_for(gone, 60)
    assert tick_until(scheduler, lambda: not scheduler.ending, 30)
    assert runner.sweep(plane.settings, set()) == []
    assert plane.get_job("acme", job.id).state == "cancelled"
    plane.db.dispose()
    other.db.dispose()
