"""PostgreSQL (the suite's own server, `.ci/postgres.sh`) killed and restarted while three tunings run.

The control plane is in-process: the real `Scheduler` with runs in threads (`InlineRunner` + the fake trainer,
held mid-run at a gate) and the real REST API (`cluster.api.create_app`) driven by Starlette's TestClient. The
server is stopped with `pg_ctl -m immediate` (every backend killed, crash recovery on the next start) on the data
dir the script uses, and started again the same way the script starts it.

What must hold: while it is down every API answer is a retryable 503 with Retry-After (never a 500, never a
hang); the scheduler's tick fails without harm; once it is back the pooled connections the server dropped are
replaced (pool_pre_ping) and the API answers again; every job ends `succeeded` on its first attempt (none lost,
none run twice), with exactly one usage row per attempt and one adapter per job.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import time
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cluster.api import create_app
from cluster.db import Adapter, Job, UsageRecord
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from tests.cluster.conftest import (
    NO_POSTGRES, POSTGRES_URL, drop_postgres_database, fresh_postgres_database, png_bytes, spec_dict, submit_simple,
    test_settings, wait_for, with_timing,
)
from tests.cluster.fake_trainer import FakeTrainer, ThreadGate

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason=NO_POSTGRES)
JOBS = 3


class PostgresServer:
    """The server `.ci/postgres.sh` started: its data dir and port, stopped and started with its own pg_ctl."""

    def __init__(self, url: str):
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert bindirs, "no PostgreSQL binaries under /usr/lib/postgresql"
        self.bindir = bindirs[-1]
        self.root = os.environ.get("CT2I_PG_DIR", "/tmp/ct2i-postgres")
        self.data = os.path.join(self.root, "data")
        self.port = urlparse(url.replace("postgresql+psycopg", "postgresql")).port or 5432

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        command = [f"{self.bindir}/pg_ctl", "-D", self.data, *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def running(self) -> bool:
        return self._pg_ctl("status").returncode == 0

    def kill(self) -> None:
        done = self._pg_ctl("-m", "immediate", "-w", "stop")
        assert done.returncode == 0, done.stderr

    def start(self) -> None:
        done = self._pg_ctl("-l", os.path.join(self.root, "server.log"), "-w", "-t", "60", "-o",
                            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 -c fsync=off",
                            "start")
        assert done.returncode == 0, done.stderr + done.stdout


@pytest.fixture
def control_plane(tmp_path):
    server = PostgresServer(POSTGRES_URL)
    assert server.running(), "the suite's PostgreSQL is not running"
    url, name = fresh_postgres_database()
    settings = with_timing(test_settings(tmp_path, url), heartbeat_seconds=0.2, lease_seconds=30.0,
                           progress_write_seconds=0.0)
    plane = ControlPlane.open(settings)
    try:
        yield server, settings, plane
    finally:
        if not server.running():
            server.start()
        plane.db.dispose()
        drop_postgres_database(name)


def test_postgres_restarted_mid_run_nothing_lost_clients_see_503(control_plane, fault_figure):
    server, settings, plane = control_plane
    plane.create_tenant("acme", Quotas(max_concurrent_jobs=JOBS))
    jobs = [submit_simple(plane, "acme", name=f"pets{n}") for n in range(JOBS)]
    gate = ThreadGate(allowed=2)
    scheduler = Scheduler(settings, InlineRunner(FakeTrainer(gate)), capacity_gpus=4)
    scheduler.tick()
    assert wait_for(lambda: all(plane.get_job("acme", j.id).progress.step >= 2 for j in jobs), 60)
    client = TestClient(create_app(plane=plane, notify=lambda _job: None), raise_server_exceptions=False)
    key = {"Authorization": f"Bearer {plane.create_key('tenant', 'acme').key}"}
    body = {"spec": spec_dict("acme", name="during"), "images": {"a.png": base64.b64encode(png_bytes()).decode()}}

    server.kill()
    killed_at = time.monotonic()
    answers: list[tuple[str, int, str | None, float]] = []
    tick_errors = 0
    while time.monotonic() - killed_at < 3.0:  # what clients and the scheduler see while it is down
        for method, path, kwargs in (("GET", "/v1/tunings", {}), ("GET", f"/v1/tunings/{jobs[0].id}", {}),
                                     ("POST", "/v1/tunings", {"json": body})):
            sent = time.monotonic()
            response = client.request(method, path, headers=key, **kwargs)
            answers.append((f"{method} {path}", response.status_code, response.headers.get("retry-after"),
                            time.monotonic() - sent))
        try:
            scheduler.tick()
        except Exception:
            tick_errors += 1
    down = [a for a in answers]
    assert down and all(status == 503 and retry for _, status, retry, _ in down), down[:6]
    assert max(seconds for *_, seconds in down) < 10.0  # refused fast, not hung
    assert tick_errors > 0  # the tick did touch the database and failed; SchedulerLoop logs and goes on

    server.start()
    restarted_at = time.monotonic()
    assert wait_for(lambda: client.get("/v1/tunings", headers=key).status_code == 200, 60, every=0.1)
    recovered_at = time.monotonic()
    after = client.post("/v1/tunings", headers=key, json={**body, "spec": spec_dict("acme", name="after")})
    assert after.status_code in (200, 201), after.text

    gate.open()

    def idle():
        scheduler.tick()
        return all(j.state in ("succeeded", "failed", "cancelled") for j in plane.list_jobs(None))

    assert wait_for(idle, 120)
    with plane.db.read() as session:
        rows = {j.id: j for j in session.execute(select(Job)).scalars()}
        usage = session.execute(select(UsageRecord.job_id, UsageRecord.attempt)).all()
        adapters = session.execute(select(Adapter.job_id)).scalars().all()
    expected = {j.id for j in jobs} | {after.json()["id"]}
    assert set(rows) == expected, "a job was lost or one was added by a refused submit"
    assert {(r.state, r.attempts) for r in rows.values()} == {("succeeded", 1)}, {r.id: (r.state, r.attempts) for r in rows.values()}
    assert sorted(usage) == sorted((job_id, 1) for job_id in expected)
    assert sorted(adapters) == sorted(expected)
    fault_figure(killed="PostgreSQL (pg_ctl -m immediate, then start)", requests_while_down=len(down),
                 requests_failed_non_retryable=sum(1 for a in down if a[1] != 503), jobs_lost=0,
                 jobs_duplicated=sum(r.attempts - 1 for r in rows.values()),
                 recovery_s=round(recovered_at - killed_at, 2), after_restart_s=round(recovered_at - restarted_at, 2))
