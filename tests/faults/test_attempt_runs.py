"""Each attempt runs as a Ray task owned by the scheduler's detached launcher actor (`cluster.runner._AttemptLauncher`),
so it outlives the scheduler that launched it: a new scheduler adopts it by name, runs of attempts that ended while
no scheduler watched are swept, and every run is released once it has returned (or ended after `ENDING_GRACE_S`
if it never does).

On the session's Ray, with `Scheduler` objects in this process standing for the scheduler actor: one that is
closed and never ticks again is a dead scheduler as far as the runs are concerned. The kill of the real actor
mid-run is tests/faults/test_scheduler_restarts.py. SQLite only: no database code is new here. In the fault suite
(`make cluster-faults`), not `make test`: each test pays a fresh launcher and a fresh trainer process (~50 s here),
and the lost-launcher case is a fault run of its own.
"""

from __future__ import annotations

import time

import pytest

from cluster import scheduler as scheduler_module
from cluster.runner import RayTaskRunner, attempt_run_name, run_dir_for, running_attempts, stop_launchers
from cluster.scheduler import Scheduler
from tests.cluster.conftest import db, db_url, plane, postgres_template, settings, sqlite_template  # noqa: F401 (fixtures)
from tests.cluster.conftest import submit_simple, wait_for, with_timing
from tests.cluster.fake_trainer import FakeTrainer, FileGate

pytestmark = [pytest.mark.timeout(400), pytest.mark.usefixtures("ray_cluster"),
              pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}


@pytest.fixture
def timed(settings):
    fast = with_timing(settings, tick_seconds=0.2, heartbeat_seconds=0.3, lease_seconds=3.0, progress_write_seconds=0.0)
    return fast.model_copy(update={"scheduler_name": f"ct2i-runs-{id(settings)}"})


def tick_until(scheduler: Scheduler, predicate, timeout: float) -> bool:
    def ticked():
        scheduler.tick()
        return predicate()

    return wait_for(ticked, timeout, 0.2)


def trainer_log(plane, job_id: str) -> tuple[list[int], list[int]]:
    lines = (run_dir_for(plane, "acme", job_id) / "trainer" / "steps.log").read_text().splitlines()
    return ([int(line.split()[1]) for line in lines if line.startswith("start")],
            [int(line.split()[1]) for line in lines if line.startswith("step")])


def test_a_new_scheduler_adopts_the_running_attempt_and_it_finishes_once(timed, plane, tmp_path):
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 8, "checkpoint_every": 2}, resources=CPU_JOB)
    gate = FileGate(tmp_path / "gate")
    gate.allow_up_to(2)
    first = Scheduler(timed, RayTaskRunner(FakeTrainer(gate)))
    assert tick_until(first, lambda: (plane.get_job("acme", job.id).progress.checkpoint_step or 0) >= 2, 120)
    name = attempt_run_name(timed, "acme", job.id, 1)
    assert running_attempts(timed) == [name]
    first.close()  # never ticks again: as far as the run is concerned, its scheduler is gone

    second = Scheduler(timed, RayTaskRunner(FakeTrainer(gate)))
    second.tick()
    assert list(second.handles) == [(job.id, 1)], "the running attempt was not adopted"
    gate.allow_up_to("open")
    assert tick_until(second, lambda: plane.get_job("acme", job.id).state == "succeeded", 120)
    assert plane.get_job("acme", job.id).attempts == 1
    assert trainer_log(plane, job.id) == ([0], list(range(1, 9)))  # one trainer, no step twice
    # Its run returned: the adopting scheduler releases it, or the launcher would hold it for good.
    assert tick_until(second, lambda: not second.handles and running_attempts(timed) == [], 60), "the run was never released"
    assert second.handles == {} and second.ending == {}
    second.close()


def test_runs_of_attempts_that_ended_while_no_scheduler_watched_are_swept(timed, plane, tmp_path):
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 8, "checkpoint_every": 2}, resources=CPU_JOB)
    gate = FileGate(tmp_path / "gate")
    gate.allow_up_to(1)
    first = Scheduler(timed, RayTaskRunner(FakeTrainer(gate)))
    assert tick_until(first, lambda: plane.get_job("acme", job.id).progress.step >= 1, 120)
    first.close()
    plane.cancel_job("acme", job.id)  # while no scheduler runs: nobody holds a handle on the run
    # The run sees its row cancelled at its next heartbeat and returns, but the launcher holds it until it is
    # released: without the sweep, for good.
    time.sleep(2.0)
    assert running_attempts(timed) == [attempt_run_name(timed, "acme", job.id, 1)]

    second = Scheduler(timed, RayTaskRunner(FakeTrainer(gate)))
    assert tick_until(second, lambda: not second.ending and running_attempts(timed) == [], 60), \
        "the run of a cancelled attempt was kept"
    assert plane.get_job("acme", job.id).state == "cancelled"
    assert trainer_log(plane, job.id)[1] == [1]  # it stopped at the gate, where the cancel found it
    assert second.handles == {} and second.ending == {}
    second.close()


class IgnoresStops:
    """A train function that never returns and never looks at its row: a hung driver."""

    def __call__(self, spec, run_dir, ctx):
        while True:
            time.sleep(1.0)


def test_a_run_that_never_returns_is_ended_after_the_grace(timed, plane, monkeypatch):
    monkeypatch.setattr(scheduler_module, "ENDING_GRACE_S", 2.0)
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", resources=CPU_JOB)
    scheduler = Scheduler(timed, RayTaskRunner(IgnoresStops()))
    assert tick_until(scheduler, lambda: plane.get_job("acme", job.id).state == "running", 120)
    plane.cancel_job("acme", job.id)
    scheduler.tick()
    assert list(scheduler.ending) == [(job.id, 1)]  # a started run is given its grace to stop itself
    time.sleep(1.0)
    scheduler.tick()
    assert running_attempts(timed) == [attempt_run_name(timed, "acme", job.id, 1)]
    assert tick_until(scheduler, lambda: not scheduler.ending and running_attempts(timed) == [], 60), "a hung run was never ended"
    assert scheduler.ending == {}
    scheduler.close()


def test_a_run_that_could_never_be_placed_is_ended_after_the_grace(timed, plane, monkeypatch):
    monkeypatch.setattr(scheduler_module, "ENDING_GRACE_S", 2.0)
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", resources=CPU_JOB)
    scheduler = Scheduler(timed, RayTaskRunner(FakeTrainer(), num_cpus=64))  # the session's Ray has 4 CPUs
    assert tick_until(scheduler, lambda: list(scheduler.handles) == [(job.id, 1)], 60)
    assert plane.get_job("acme", job.id).state == "admitted"
    plane.cancel_job("acme", job.id)
    assert tick_until(scheduler, lambda: not scheduler.ending and running_attempts(timed) == [], 60), \
        "a pending run was left waiting for CPUs"
    assert scheduler.ending == {} and plane.get_job("acme", job.id).state == "cancelled"
    scheduler.close()


def test_a_lost_launcher_is_a_lost_run_and_the_job_is_retried(timed, plane, tmp_path):
    plane.create_tenant("acme")
    job = submit_simple(plane, "acme", train={"resolution": 64, "steps": 4, "checkpoint_every": 2}, resources=CPU_JOB)
    gate = FileGate(tmp_path / "gate")
    gate.allow_up_to(2)
    scheduler = Scheduler(timed, RayTaskRunner(FakeTrainer(gate)))
    assert tick_until(scheduler, lambda: (plane.get_job("acme", job.id).progress.checkpoint_step or 0) >= 2, 120)
    assert stop_launchers(timed) == 1  # its tasks are killed with their owner
    gate.allow_up_to("open")
    assert tick_until(scheduler, lambda: plane.get_job("acme", job.id).state == "succeeded", 120)
    view = plane.get_job("acme", job.id)
    starts, _ = trainer_log(plane, job.id)
    assert view.attempts == 2 and starts == [0, 2], (view.attempts, starts)  # resumed from the checkpoint
    scheduler.close()
