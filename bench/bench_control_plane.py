"""Control-plane benchmarks (issue 4): admission decisions per second with 10,000 queued jobs across 1,000
tenants, and p50/p99 latency of GET /v1/tunings/{id} under 8 concurrent clients on loopback.

    .venv/bin/python bench/bench_control_plane.py [--database-url URL] [--json]

Figures go into BENCHMARKS.md. Everything runs locally (SQLite by default); nothing touches the network
beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from cluster.admission import AdmissionPolicy, FairShareQueue, QueuedJob, TenantState  # noqa: E402
from cluster.config import ControlPlaneSettings  # noqa: E402
from cluster.db import Job, Tenant  # noqa: E402

TENANTS, JOBS = 1_000, 10_000


def bench_admission_in_memory(decisions: int = 20_000, capacity: int = 64, seed: int = 0) -> dict:
    """One decision = a running job ends, its tenant is re-keyed, and the next job is chosen for the free GPU."""
    rng = random.Random(seed)
    queue = FairShareQueue(AdmissionPolicy(min_charge_s=60, starvation_after_s=600))
    states = {f"t{i:04d}": TenantState(name=f"t{i:04d}", weight=rng.choice([1, 1, 2, 4]), max_concurrent_jobs=4,
                                       max_concurrent_gpus=8) for i in range(TENANTS)}
    for state in states.values():
        queue.set_tenant(state)
    for n in range(JOBS + decisions + capacity):
        queue.push(QueuedJob(f"j{n:06d}", f"t{rng.randrange(TENANTS):04d}", 1.0, float(n)))
    running = [job for job in queue.decide(capacity, capacity, now=0.0).admitted]
    assert len(queue) >= JOBS
    made = 0
    start = time.perf_counter()
    while made < decisions:
        done = running.pop(rng.randrange(len(running)))
        state = states[done.tenant]
        state.running_jobs -= 1
        state.running_gpus -= done.demand_gpus
        state.recent_gpu_s += rng.uniform(10, 100)
        queue.set_tenant(state)
        admitted = queue.decide(1.0, capacity, now=float(made)).admitted
        running.extend(admitted)
        made += 1
    elapsed = time.perf_counter() - start
    return {"decisions": made, "seconds": elapsed, "decisions_per_s": made / elapsed, "queued_at_end": len(queue)}


class _NoopRunner:
    def launch(self, settings, request):
        return request

    def poll(self, handle):
        return None

    def cancel(self, handle, *, force=False):
        pass

    def sweep(self, settings, tracked):
        return []


def _seed_database(plane, rng) -> None:
    now = time.time()
    with plane.db.write() as session:
        session.execute(insert(Tenant), [{"name": f"t{i:04d}", "weight": rng.choice([1, 2]), "max_concurrent_jobs": 4,
                                          "created_at": now} for i in range(TENANTS)])
        session.execute(insert(Job), [{
            "id": f"job-{n:012d}", "tenant": f"t{rng.randrange(TENANTS):04d}", "name": "bench", "spec_json": "{}",
            "state": "queued", "demand_gpus": 1.0, "created_at": now + n * 1e-3, "updated_at": now,
        } for n in range(JOBS)])


def bench_admission_database(database_url: str | None, admit_per_tick: int = 200, ticks: int = 5) -> dict:
    """Full scheduler ticks through the database: rebuild from 10,000 queued rows, decide, commit each admission."""
    from cluster.scheduler import Scheduler
    from cluster.service import ControlPlane

    home = Path(tempfile.mkdtemp(prefix="ct2i-bench-"))
    settings = ControlPlaneSettings(home=home, database_url=database_url or f"sqlite:///{home / 'ct2i.db'}",
                                    artifacts_uri=str(home / "artifacts"), capacity_gpus=admit_per_tick * ticks)
    plane = ControlPlane.open(settings)
    _seed_database(plane, random.Random(1))
    scheduler = Scheduler(settings, _NoopRunner(), capacity_gpus=admit_per_tick)
    admitted, elapsed = 0, 0.0
    for tick in range(ticks):
        scheduler._capacity = admit_per_tick * (tick + 1)
        start = time.perf_counter()
        admitted += scheduler.admit(time.time())
        elapsed += time.perf_counter() - start
    return {"backend": settings.database_url.split(":", 1)[0], "admitted": admitted, "seconds": elapsed,
            "decisions_per_s": admitted / elapsed, "per_tick_ms": 1000 * elapsed / ticks}


def bench_get_latency(database_url: str | None, clients: int = 8, requests_per_client: int = 200) -> dict:
    import httpx
    import uvicorn

    from cluster.api import create_app
    from cluster.service import ControlPlane
    from cluster.store import ArtifactStore

    home = Path(tempfile.mkdtemp(prefix="ct2i-bench-api-"))
    settings = ControlPlaneSettings(home=home, database_url=database_url or f"sqlite:///{home / 'ct2i.db'}",
                                    artifacts_uri=str(home / "artifacts"))
    plane = ControlPlane.open(settings)
    _seed_database(plane, random.Random(2))
    key = plane.create_key("tenant", "t0000").key
    with plane.db.read() as session:
        from sqlalchemy import select

        job_ids = session.execute(select(Job.id).where(Job.tenant == "t0000")).scalars().all()
    app = create_app(plane=ControlPlane(settings=settings, db=plane.db, store=ArtifactStore(settings.artifacts_uri)),
                     notify=lambda _: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        mine = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as http:
            for n in range(requests_per_client):
                start = time.perf_counter()
                response = http.get(f"/v1/tunings/{job_ids[n % len(job_ids)]}")
                mine.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(10)
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "throughput_rps": len(latencies) / wall}


def fresh_database(url: str | None) -> str | None:
    """A new PostgreSQL database on the server of `url` (each benchmark seeds its own rows); None = SQLite."""
    if not url or "postgresql" not in url:
        return None
    import sqlalchemy

    name = "ct2i_bench_" + secrets.token_hex(4)
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {
        "admission_in_memory": bench_admission_in_memory(),
        "admission_database": bench_admission_database(fresh_database(args.database_url)),
        "get_tuning_latency": bench_get_latency(fresh_database(args.database_url)),
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        a, d, g = results["admission_in_memory"], results["admission_database"], results["get_tuning_latency"]
        print(f"admission (in memory, {JOBS} queued / {TENANTS} tenants): {a['decisions_per_s']:,.0f} decisions/s")
        print(f"admission (scheduler tick through {d['backend']}): {d['decisions_per_s']:,.0f} decisions/s "
              f"({d['per_tick_ms']:.0f} ms per tick of 200)")
        print(f"GET /v1/tunings/{{id}}, {g['clients']} clients: p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} ms, "
              f"{g['throughput_rps']:.0f} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
