"""Bounded, fair connections at the ASGI level (no Ray): the ingress app under a real uvicorn server on loopback,
a fake generator that holds tenant A's generations until the test lets them go.

Tenant A opens its 5 event streams (and tries 50), sends 5 slow generations; tenant B's GET, generate, event
stream and `/healthz` must each answer within `FAIR_BOUND_S`, and A's sixth stream and fifth generation get
429 with Retry-After without costing A a rate-limit token.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
import yaml

from cluster.config import ControlPlaneSettings, ServeSettings
from cluster.http import HTTPProblem
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from cluster.slots import RequestSlots, TenantSlots
from serve.app import INGRESS_MAX_ONGOING_REQUESTS, INGRESS_SHORT_REQUEST_SLOTS, check_ingress_slots
from serve.ingress import LocalRateLimiter, TokenBuckets, create_ingress_app
from serve.schemas import GeneratedImages
from tests.cluster.conftest import submit_simple

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
FAIR_BOUND_S = 2.0
"""The stated bound: another tenant's request is never queued behind a tenant at its caps, so it answers in
its own time; 2 s covers a GET (two SQLite reads in the thread pool) on a loaded 2-core machine."""


# -- the slots themselves -------------------------------------------------------------------------


def test_a_tenant_past_its_cap_gets_429_and_others_are_unaffected():
    slots = TenantSlots("streams", per_tenant=2, total=3, retry_after_s=7, setting="serve.max_streams_per_tenant")
    held = [slots.acquire("a"), slots.acquire("a")]
    with pytest.raises(HTTPProblem) as refused:
        slots.acquire("a")
    assert refused.value.status == 429 and refused.value.field == "serve.max_streams_per_tenant"
    assert refused.value.headers == {"Retry-After": "7"}
    with slots.acquire("b"):
        with pytest.raises(HTTPProblem) as full:  # the total (3) is reached: 503 for everyone
            slots.acquire("c")
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "7"}
    assert slots.held("b") == 0 and slots.held() == 2
    held[0].release()
    held[0].release()  # idempotent: a finally and a disconnect may both release
    assert slots.held("a") == 1
    slots.acquire("a").release()


def test_caps_must_fit_within_their_totals():
    with pytest.raises(ValueError, match="max_streams_per_tenant"):
        ServeSettings(max_streams_per_tenant=10, max_streams=5)
    with pytest.raises(ValueError):
        TenantSlots("x", per_tenant=0, total=1, retry_after_s=1, setting="s")


def test_ingress_deployment_leaves_slots_for_short_requests():
    """serve/config.yaml (and so every RayService) and the decorator's default both keep room for GETs and /healthz
    beside every stream and generation the caps allow; a config that does not is refused at start."""
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    defaults = ServeSettings()
    long_slots = RequestSlots.from_settings(defaults).long_slots
    for max_ongoing in (ingress["max_ongoing_requests"], INGRESS_MAX_ONGOING_REQUESTS):
        assert max_ongoing >= long_slots + INGRESS_SHORT_REQUEST_SLOTS
        check_ingress_slots(defaults, max_ongoing)
    with pytest.raises(ValueError, match="max_ongoing_requests is 5"):
        check_ingress_slots(defaults, 5)  # Serve's default, which let 5 streams hang the whole API


# -- the app under uvicorn ------------------------------------------------------------------------


class HeldGenerator:
    """Tenant A's generations run until `release` (slow generations); everyone else's answer at once."""

    def __init__(self, slow_tenant: str):
        self.slow_tenant = slow_tenant
        self.released = threading.Event()
        self.running: dict[str, int] = {}

    async def __call__(self, model_id, call):
        self.running[call.tenant] = self.running.get(call.tenant, 0) + 1
        try:
            while call.tenant == self.slow_tenant and not self.released.is_set():
                await asyncio.sleep(0.02)
            return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                                   batch_size=1, timings={"denoise": 0.0})
        finally:
            self.running[call.tenant] -= 1


class LiveIngress:
    def __init__(self, app):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def world(tmp_path):
    settings = ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                    artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    keys, jobs = {}, {}
    for tenant in ("a", "b"):
        plane.create_tenant(tenant, Quotas(generate_rpm=1000))
        keys[tenant] = {"Authorization": f"Bearer {plane.create_key('tenant', tenant).key}"}
        jobs[tenant] = submit_simple(plane, tenant).id  # queued for good (no scheduler): its stream stays open
    # A stopped clock: no bucket refills during the test, so the tokens a request took are counted exactly
    # (at 1000/min a loaded box's 30 ms between two reads refilled half a token). 1000 tokens outlast the test.
    buckets = TokenBuckets(clock=lambda: 0.0)
    generator = HeldGenerator("a")
    slots = RequestSlots.from_settings(settings.serve)
    app = create_ingress_app(plane, generator, limiter=LocalRateLimiter(buckets), slots=slots)
    return plane, keys, jobs, buckets, generator, slots, app


async def _open_stream(client: httpx.AsyncClient, job_id: str, headers) -> httpx.Response:
    return await client.send(client.build_request("GET", f"/v1/tunings/{job_id}/events", headers=headers), stream=True)


async def _timed(call) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await call
    return response, time.perf_counter() - started


async def _wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("attempted_streams", [5, 50])
def test_tenant_at_its_caps_never_delays_another_tenant(world, attempted_streams):
    plane, keys, jobs, buckets, generator, slots, app = world
    serve = plane.settings.serve
    body = {"adapter": "base", "prompt": "a cat", "steps": 100, "n": 8, "width": 256, "height": 256, "format": "json"}

    async def scenario():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
            streams = await asyncio.gather(*(_open_stream(client, jobs["a"], keys["a"]) for _ in range(attempted_streams)))
            admitted = [s for s in streams if s.status_code == 200]
            refused = [s for s in streams if s.status_code != 200]
            for response in refused:
                await response.aread()
                assert response.status_code == 429 and response.headers["retry-after"] == str(serve.busy_retry_after_s)
                assert response.json()["detail"]["field"] == "serve.max_streams_per_tenant"
            assert len(admitted) == serve.max_streams_per_tenant == 5
            sixth = await client.get(f"/v1/tunings/{jobs['a']}/events", headers=keys["a"])
            assert sixth.status_code == 429 and int(sixth.headers["retry-after"]) >= 1

            tokens_before = buckets.remaining("a", 1000)
            generations = [asyncio.create_task(client.post("/v1/generate", json=body, headers=keys["a"])) for _ in range(5)]
            await _wait_until(lambda: generator.running.get("a", 0) == serve.max_generations_per_tenant
                              and sum(g.done() for g in generations) == 1)
            (over_task,) = [g for g in generations if g.done()]
            over = over_task.result()
            assert over.status_code == 429 and over.json()["detail"]["field"] == "serve.max_generations_per_tenant"
            assert int(over.headers["retry-after"]) >= 1
            # 4 admitted generations took 4 tokens; the one refused at the cap took none.
            assert buckets.remaining("a", 1000) == tokens_before - 4

            # Tenant A now holds every slot its caps allow. B's requests each answer within the bound.
            timings = {}
            for name, call in (
                ("healthz", client.get("/healthz")),
                ("get", client.get(f"/v1/tunings/{jobs['b']}", headers=keys["b"])),
                ("list", client.get("/v1/adapters", headers=keys["b"])),
                ("generate", client.post("/v1/generate", json={**body, "steps": 4, "n": 1}, headers=keys["b"])),
            ):
                response, seconds = await _timed(call)
                assert response.status_code == 200, (name, response.text)
                timings[name] = seconds
            b_stream, seconds = await _timed(_open_stream(client, jobs["b"], keys["b"]))
            assert b_stream.status_code == 200
            timings["stream"] = seconds
            await b_stream.aclose()
            assert max(timings.values()) < FAIR_BOUND_S, timings
            assert slots.generations.held("a") == 4 and not any(g.done() for g in generations if g is not over_task)

            # A's streams were open all along; closing them gives the slots back, so A may stream again.
            for stream in admitted:
                await stream.aclose()
            await _wait_until(lambda: slots.streams.held("a") == 0)
            again = await _open_stream(client, jobs["a"], keys["a"])
            assert again.status_code == 200
            await again.aclose()
            generator.released.set()
            finished = await asyncio.gather(*generations)
            assert sorted(r.status_code for r in finished) == [200, 200, 200, 200, 429]
            await _wait_until(lambda: slots.generations.held() == 0 and slots.streams.held() == 0)

    with LiveIngress(app) as base_url:
        asyncio.run(scenario())
