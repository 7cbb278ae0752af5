"""The job state machine: legal moves, refused moves (in code and in the database), and racing writers."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from cluster.db import Job, JobEvent, UsageRecord
from cluster.states import IllegalTransition, LEGAL, end_attempt, transition
from tests.cluster.conftest import submit_simple


@pytest.fixture
def job_id(plane):
    plane.create_tenant("acme")
    return submit_simple(plane, "acme").id


def _state(db, job_id):
    with db.read() as session:
        return session.get(Job, job_id)


def test_happy_path_records_every_transition_and_counts_attempts(plane, db, job_id):
    with db.write() as session:
        assert transition(session, job_id, expected="queued", to="admitted", now=10.0)
        assert transition(session, job_id, expected="admitted", to="running", now=11.0, attempt=1)
        # running → queued: the run vanished; the retry is counted on the next admission.
        assert transition(session, job_id, expected="running", to="queued", now=12.0)
        assert transition(session, job_id, expected="queued", to="admitted", now=13.0)
        assert transition(session, job_id, expected="admitted", to="running", now=14.0, attempt=2)
        assert transition(session, job_id, expected="running", to="succeeded", now=15.0, attempt=2)
    job = _state(db, job_id)
    assert (job.state, job.attempts, job.finished_at) == ("succeeded", 2, 15.0)
    with db.read() as session:
        states = [e.state for e in session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()]
    assert states == ["queued", "admitted", "running", "queued", "admitted", "running", "succeeded"]


@pytest.mark.parametrize(("source", "target"), [
    (s, t) for s in LEGAL for t in LEGAL if t != s and t not in LEGAL[s]
])
def test_illegal_transitions_are_refused_by_code(source, target):
    with pytest.raises(IllegalTransition):
        transition(None, "job-x", expected=source, to=target, now=0.0)


def test_database_trigger_refuses_illegal_transition_from_raw_sql(plane, db, job_id):
    with pytest.raises(DBAPIError, match="illegal job state transition"):
        with db.write() as session:
            session.execute(text("UPDATE jobs SET state = 'succeeded' WHERE id = :id"), {"id": job_id})
    assert _state(db, job_id).state == "queued"
    with db.write() as session:
        assert transition(session, job_id, expected="queued", to="cancelled", now=1.0)
    with pytest.raises(DBAPIError, match="illegal job state transition"):
        with db.write() as session:
            session.execute(text("UPDATE jobs SET state = 'queued' WHERE id = :id"), {"id": job_id})


def test_wrong_expected_state_changes_nothing(plane, db, job_id):
    with db.write() as session:
        assert not transition(session, job_id, expected="running", to="succeeded", now=1.0)
    assert _state(db, job_id).state == "queued"


def test_stale_attempt_cannot_write(plane, db, job_id):
    with db.write() as session:
        transition(session, job_id, expected="queued", to="admitted", now=1.0)
        transition(session, job_id, expected="admitted", to="running", now=2.0, attempt=1)
        transition(session, job_id, expected="running", to="queued", now=3.0)
        transition(session, job_id, expected="queued", to="admitted", now=4.0)
        transition(session, job_id, expected="admitted", to="running", now=5.0, attempt=2)
        # The first attempt's runner comes back from the dead and reports success: fenced off.
        assert not transition(session, job_id, expected="running", to="succeeded", now=6.0, attempt=1)
    assert _state(db, job_id).state == "running"


def test_racing_writers_admit_a_job_exactly_once(plane, db, job_id):
    writers = 8
    barrier = threading.Barrier(writers)
    wins: list[bool] = []
    errors: list[BaseException] = []

    def admit():
        try:
            barrier.wait()
            with db.write() as session:
                wins.append(transition(session, job_id, expected="queued", to="admitted", now=1.0))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=admit) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(wins) == [False] * (writers - 1) + [True]
    job = _state(db, job_id)
    assert (job.state, job.attempts) == ("admitted", 1)
    with db.read() as session:
        admitted = session.execute(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.state == "admitted")).all()
    assert len(admitted) == 1


def test_end_attempt_charges_usage_once(plane, db, job_id):
    with db.write() as session:
        transition(session, job_id, expected="queued", to="admitted", now=100.0)
        transition(session, job_id, expected="admitted", to="running", now=100.0, attempt=1)
    job = _state(db, job_id)
    with db.write() as session:
        assert end_attempt(session, job, to="succeeded", now=130.0, half_life_s=1e9)
        assert not end_attempt(session, job, to="failed", now=140.0, half_life_s=1e9)
    with db.read() as session:
        usage = session.execute(select(UsageRecord)).scalars().all()
    assert [(u.attempt, u.gpu_seconds) for u in usage] == [(1, pytest.approx(30.0))]
