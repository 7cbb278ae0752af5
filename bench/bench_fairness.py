"""Tenant B's latency while tenant A holds its caps, against B alone (issue 13, item 1).

    .venv/bin/python bench/bench_fairness.py [--rounds 60] [--streams 50] [--before-timeout 5]

The real ingress app (`serve.ingress.create_ingress_app`, control plane on SQLite) under uvicorn on loopback,
with a generator stub: A's generations run until the end of the run (slow generations holding their slots),
B's answer at once, so what is measured is the ingress's queueing, not a model. Three scenes, one after another
in one run, each with B's GET /v1/tunings/{id}, GET /healthz and POST /v1/generate measured `--rounds` times:

1. B alone;
2. A at its caps: A asks for `--streams` event streams (5 admitted, the rest 429) and 5 generations (4 in flight);
3. before (the bug of issue 13): the same app behind an ASGI gate of 5 slots, as Serve's default
   `max_ongoing_requests` gave the ingress, and no per-tenant caps; A holds 5 streams. B's requests time out at
   `--before-timeout` s (counted, not waited for twice).

Prints p50 / p99 per request and scene; no assertions. Record figures in BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


class HeldGenerator:
    def __init__(self, slow_tenant: str):
        self.slow_tenant = slow_tenant
        self.released = threading.Event()

    async def __call__(self, model_id, call):
        from serve.schemas import GeneratedImages

        while call.tenant == self.slow_tenant and not self.released.is_set():
            await asyncio.sleep(0.25)  # seldom: the stub's own wake-ups must not be what B measures
        return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                               batch_size=1, timings={})


class ServeDefaultSlots:
    """What Serve's `max_ongoing_requests` does to an ingress: at most `slots` requests inside; the rest wait."""

    def __init__(self, app, slots: int):
        self.app = app
        self.gate = asyncio.Semaphore(slots)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        async with self.gate:
            await self.app(scope, receive, send)


def _serve(app) -> tuple[str, callable]:
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _measure_b(client, b_job: str, b_auth: dict, rounds: int, timeout_s: float) -> dict[str, list[float | None]]:
    import httpx

    body = {"adapter": "base", "prompt": "a dog", "steps": 4, "n": 1, "format": "json"}
    calls = {"GET job": lambda: client.get(f"/v1/tunings/{b_job}", headers=b_auth, timeout=timeout_s),
             "GET /healthz": lambda: client.get("/healthz", timeout=timeout_s),
             "POST generate": lambda: client.post("/v1/generate", json=body, headers=b_auth, timeout=timeout_s)}
    seconds: dict[str, list[float | None]] = {name: [] for name in calls}
    if timeout_s > 10:  # a warm-up round (first connection, first SQLite reads), not counted
        for call in calls.values():
            await call()
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            try:
                response = await call()
                assert response.status_code == 200, response.text
                seconds[name].append(time.perf_counter() - started)
            except httpx.TimeoutException:
                seconds[name].append(None)
                if sum(v is None for v in seconds[name]) >= 2:
                    return seconds  # the scene is stuck; waiting more proves nothing new
    return seconds


async def _hold_caps(client, a_job: str, a_auth: dict, streams: int, generations: int):
    opened = await asyncio.gather(*(client.send(client.build_request("GET", f"/v1/tunings/{a_job}/events", headers=a_auth),
                                                stream=True) for _ in range(streams)))
    admitted = [r for r in opened if r.status_code == 200]
    for refused in (r for r in opened if r.status_code != 200):
        await refused.aclose()
    body = {"adapter": "base", "prompt": "a slow cat", "steps": 100, "n": 8, "width": 256, "height": 256, "format": "json"}
    tasks = [asyncio.create_task(client.post("/v1/generate", json=body, headers=a_auth, timeout=600)) for _ in range(generations)]
    await asyncio.sleep(1.0)
    refused_generations = sum(t.done() and t.result().status_code == 429 for t in tasks)
    return admitted, tasks, len(opened) - len(admitted), refused_generations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--streams", type=int, default=50, help="event streams A asks for (5 are admitted)")
    parser.add_argument("--before-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    import httpx

    from cluster.config import ControlPlaneSettings
    from cluster.schemas import Quotas
    from cluster.service import ControlPlane
    from serve.ingress import create_ingress_app
    from tests.cluster.conftest import submit_simple

    work = Path(tempfile.mkdtemp(prefix="ct2i-bench-fair-"))
    settings = ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'db.sqlite'}",
                                    artifacts_uri=str(work / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    auth, jobs = {}, {}
    for tenant in ("a", "b"):
        plane.create_tenant(tenant, Quotas(generate_rpm=100_000))
        auth[tenant] = {"Authorization": f"Bearer {plane.create_key('tenant', tenant).key}"}
        jobs[tenant] = submit_simple(plane, tenant).id
    results: dict[str, dict[str, list[float | None]]] = {}
    notes: dict[str, str] = {}

    async def scene(app, name: str, hold: bool, streams: int, generations: int, timeout_s: float):
        base_url, stop = _serve(app)
        generator.released.clear()
        try:
            limits = httpx.Limits(max_connections=500, max_keepalive_connections=20)
            async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
                held, tasks = [], []
                if hold:
                    held, tasks, refused_streams, refused_generations = await _hold_caps(client, jobs["a"], auth["a"], streams, generations)
                    notes[name] = (f"A holds {len(held)} streams ({refused_streams} refused) and "
                                   f"{sum(not t.done() for t in tasks)} generations ({refused_generations} refused)")
                results[name] = await _measure_b(client, jobs["b"], auth["b"], args.rounds, timeout_s)
                generator.released.set()
                for stream in held:
                    await stream.aclose()
                for task in tasks:
                    try:
                        await asyncio.wait_for(task, 30)
                    except Exception:
                        pass
        finally:
            stop()

    generator = HeldGenerator("a")
    capped = create_ingress_app(plane, generator)
    asyncio.run(scene(capped, "B alone", False, 0, 0, 30))
    asyncio.run(scene(capped, "A at its caps", True, args.streams, 5, 30))
    uncapped_settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={
        "max_streams_per_tenant": 10_000, "max_generations_per_tenant": 10_000, "max_streams": 10_000, "max_generations": 10_000})})
    plane.settings = uncapped_settings
    before = ServeDefaultSlots(create_ingress_app(plane, generator), 5)
    asyncio.run(scene(before, "before: 5 Serve slots, no caps", True, 5, 0, args.before_timeout))

    print(f"{'scene':34} {'request':14} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'timeouts':>8}")
    for name, per_request in results.items():
        for request, values in per_request.items():
            done = [v for v in values if v is not None]
            timeouts = len(values) - len(done)
            p50 = f"{statistics.median(done) * 1000:8.1f}" if done else "       -"
            p99 = f"{_percentile(done, 0.99) * 1000:8.1f}" if done else "       -"
            print(f"{name:34} {request:14} {len(values):4d} {p50} {p99} {timeouts:8d}")
        if name in notes:
            print(f"  ({notes[name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
