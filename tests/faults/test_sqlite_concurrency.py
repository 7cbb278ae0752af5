"""Concurrent writes on one SQLite control plane: 50 submits from 10 threads of one process, and 50 from 10
threads spread over 5 processes, each batch released at once. No submit may fail (no `database is locked`),
and every job a submit returned is in the table exactly once, with its images stored.

What makes this hold is in `cluster.db.make_engine`: WAL (readers never block the writer), a 60 s busy timeout,
and write transactions that take the write lock up front (BEGIN IMMEDIATE), so a transaction never fails
half-way when another writer got in between its read and its write.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback

from sqlalchemy import func, select

from cluster.config import ControlPlaneSettings
from cluster.db import Job, JobEvent
from cluster.schemas import Quotas
from cluster.service import ControlPlane

SUBMITS = 50
THREADS = 10
PROCESSES = 5


def _settings(root) -> ControlPlaneSettings:
    return ControlPlaneSettings(home=root / "home", database_url=f"sqlite:///{root / 'ct2i.db'}",
                                artifacts_uri=str(root / "artifacts"), capacity_gpus=4,
                                limits={"max_images_per_job": 6, "max_image_bytes": 200_000})


def _cpu_spec(tenant: str, name: str = "pets") -> dict:
    """A CPU job: submit checks its placement but builds no model for a GPU memory plan, so what contends is the
    database, not five processes building the tiny base at once."""
    from tests.cluster.conftest import spec_dict

    spec = spec_dict(tenant, name=name)
    spec["resources"]["gpus_per_worker"] = 0
    return spec


def _submit_many(plane: ControlPlane, count: int, threads: int):
    """`count` submits from `threads` threads released together; returns (job ids, errors)."""
    from tests.cluster.conftest import png_bytes

    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    release = threading.Barrier(threads)
    image = png_bytes()

    def worker(index: int):
        release.wait()
        for n in range(index, count, threads):
            try:
                view = plane.submit("acme", _cpu_spec("acme", name=f"j{n}"), {"a.png": image})
                with lock:
                    ids.append(view.id)
            except Exception:
                with lock:
                    errors.append(traceback.format_exc(limit=3))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(300)
    return ids, errors


def _warm(plane: ControlPlane) -> None:
    """One submit for tenant `warm` first: the first submit of a process imports what a spec check needs (seconds),
    which would otherwise spread the contended submits out instead of piling them up."""
    from tests.cluster.conftest import png_bytes

    plane.submit("warm", _cpu_spec("warm"), {"a.png": png_bytes()})


def _process_main(root, count, threads, ready, go, results):
    plane = ControlPlane.open(_settings(root))
    _warm(plane)
    ready.put(1)
    go.wait(300)
    ids, errors = _submit_many(plane, count, threads)
    results.put((ids, errors))


def _check(plane: ControlPlane, ids: list[str], errors: list[str]) -> None:
    assert not errors, f"{len(errors)} submits failed; first: {errors[0]}"
    assert len(ids) == SUBMITS and len(set(ids)) == SUBMITS
    with plane.db.read() as session:
        rows = session.execute(select(Job.id, Job.state).where(Job.tenant == "acme")).all()
        events = session.execute(select(func.count()).select_from(JobEvent).where(JobEvent.job_id.in_(ids))).scalar_one()
    assert sorted(r.id for r in rows) == sorted(ids), "a returned job is missing from the table, or an extra one is there"
    assert {r.state for r in rows} == {"queued"}
    assert events >= SUBMITS  # each submit logged its queued event in the same transaction
    for job_id in ids:
        assert plane.get_job("acme", job_id).state == "queued"


def test_50_submits_from_10_threads(tmp_path, fault_figure):
    plane = ControlPlane.open(_settings(tmp_path))
    plane.create_tenant("acme", Quotas(max_concurrent_jobs=100))
    plane.create_tenant("warm")
    _warm(plane)
    started = time.monotonic()
    ids, errors = _submit_many(plane, SUBMITS, THREADS)
    seconds = time.monotonic() - started
    _check(plane, ids, errors)
    fault_figure(killed="none: 50 submits from 10 threads at once (SQLite)", requests_failed=len(errors),
                 jobs_lost=SUBMITS - len(set(ids)), jobs_duplicated=len(ids) - len(set(ids)), wall_s=round(seconds, 2))


def test_50_submits_from_5_processes_at_once(tmp_path, fault_figure):
    plane = ControlPlane.open(_settings(tmp_path))
    plane.create_tenant("acme", Quotas(max_concurrent_jobs=100))
    plane.create_tenant("warm", Quotas(max_concurrent_jobs=100))
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    per_process = SUBMITS // PROCESSES
    processes = [context.Process(target=_process_main, args=(tmp_path, per_process, THREADS // PROCESSES, ready, go, results))
                 for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=900)  # every process has its engine and has migrated: the submits start together
        started = time.monotonic()
        go.set()
        ids, errors = [], []
        for _ in processes:
            got_ids, got_errors = results.get(timeout=900)
            ids += got_ids
            errors += got_errors
        seconds = time.monotonic() - started
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    _check(plane, ids, errors)
    fault_figure(killed="none: 50 submits from 5 processes x 2 threads at once (SQLite)", requests_failed=len(errors),
                 jobs_lost=SUBMITS - len(set(ids)), jobs_duplicated=len(ids) - len(set(ids)), wall_s=round(seconds, 2))
