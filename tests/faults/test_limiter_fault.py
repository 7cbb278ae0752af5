"""The shared rate-limiter actor killed (SIGKILL of its process) under traffic from two tenants.

Level: a real detached Ray actor (`serve.app.ActorRateLimiter`, the class every Ingress replica uses), killed by
PID with `os.kill`, and Ray's own restart of it (`max_restarts=-1`); the ingress app is the real one
(`serve.ingress.create_ingress_app`) driven in-process by Starlette's TestClient, with a stand-in generator. No
Serve deployment: what is under test is the ingress's limiter path, and that is the same code in a replica.

What must hold: no request answers 5xx at any time; a tenant that had spent its quota before the kill stays
limited through the outage and after the restart (the restarted actor starts its buckets empty, never full);
a tenant with quota left is still served while the actor is down (each replica limits locally at its share).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time

import pytest
from fastapi.testclient import TestClient

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from serve.ingress import FailoverRateLimiter, TokenBuckets, create_ingress_app
from serve.schemas import GeneratedImages

SPENT_RPM = 3  # one token per 20 s: the test's whole window earns it at most one
BUSY_RPM = 600
REPLICAS = 2  # the limiter is told it is one of two ingress replicas: its local share is half the rate


async def fake_generate(model_id, call):
    return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                           batch_size=1)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _DeadShared:
    async def acquire(self, tenant, per_minute):
        raise ConnectionError("limiter actor died")

    async def refund(self, tenant, per_minute):
        raise ConnectionError("limiter actor died")


def test_failover_limits_locally_at_the_replica_share_from_empty_buckets():
    """Without Ray: a dead shared limiter → local buckets that start empty and refill at rate / replicas."""
    clock = _Clock()

    async def probe():
        raise ConnectionError("still dead")

    limiter = FailoverRateLimiter(_DeadShared(), probe=probe, replicas=lambda: 4, clock=clock, probe_interval_s=0.01)

    async def scenario():
        assert await limiter.acquire("t", 240) == pytest.approx(1.0)  # empty: one token in 1 / (240/4/60) s
        assert limiter.degraded and limiter.last_error.startswith("ConnectionError")
        clock.now += 10.0  # 10 s at 1 token/s (a quarter of 4/s), capped at the share's burst of 60
        granted = 0
        while await limiter.acquire("t", 240) == 0:
            granted += 1
        assert granted == 10
        await limiter.refund("t", 240)  # a refund while degraded goes to the local bucket and never raises
        assert await limiter.acquire("t", 240) == 0
        await asyncio.sleep(0.05)
        assert limiter.degraded  # the probe keeps failing: still degraded
        limiter._prober.cancel()

    asyncio.run(scenario())
    assert limiter.degraded_seconds() == pytest.approx(10.0)


def test_rebuilt_buckets_start_empty_and_refill_at_the_rate():
    clock = _Clock()
    buckets = TokenBuckets(clock, empty_as_of=clock.now)
    assert buckets.remaining("t", 60) == 0.0 and buckets.take("t", 60) == pytest.approx(1.0)
    clock.now += 120.0  # a tenant first seen long after the rebuild finds its bucket full
    assert buckets.remaining("other", 60) == 60.0


@pytest.fixture
def ingress(tmp_path, ray_cluster):
    from serve.app import ActorRateLimiter

    settings = ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                    artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    plane.create_tenant("spent", Quotas(generate_rpm=SPENT_RPM))
    plane.create_tenant("busy", Quotas(generate_rpm=BUSY_RPM))
    keys = {t: {"Authorization": f"Bearer {plane.create_key('tenant', t).key}"} for t in ("spent", "busy")}
    limiter = ActorRateLimiter(f"ct2i-faults-{secrets.token_hex(3)}", name=f"limiter-{secrets.token_hex(3)}",
                               replicas=lambda: REPLICAS, call_timeout_s=1.0, probe_interval_s=0.5)
    try:
        with TestClient(create_ingress_app(plane, fake_generate, limiter=limiter)) as client:
            yield client, keys, limiter
    finally:
        import ray

        ray.kill(limiter.actor, no_restart=True)


def test_limiter_actor_killed_no_5xx_and_spent_quota_stays_spent(ingress, fault_figure):
    import ray

    client, keys, limiter = ingress
    body = {"adapter": "base", "prompt": "a cat"}

    def post(tenant: str) -> int:
        return client.post("/v1/generate", json=body, headers=keys[tenant]).status_code

    assert [post("spent") for _ in range(SPENT_RPM)] == [200] * SPENT_RPM
    assert post("spent") == 429
    assert post("busy") == 200
    before = ray.get(limiter.actor.state.remote())
    assert ray.get(limiter.actor.remaining.remote("spent", SPENT_RPM)) < 1.0

    os.kill(before["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    statuses: list[tuple[float, str, int, bool]] = []  # (seconds after the kill, tenant, status, degraded)
    recovered_at = None
    while time.monotonic() - killed_at < 120.0:
        for tenant in ("spent", "busy"):
            status = post(tenant)
            statuses.append((time.monotonic() - killed_at, tenant, status, limiter.degraded))
        if limiter.outages and not limiter.degraded and recovered_at is None:
            recovered_at = time.monotonic()
        if recovered_at is not None and time.monotonic() - recovered_at > 2.0:
            break
        time.sleep(0.05)
    window_s = time.monotonic() - killed_at

    assert recovered_at is not None, f"the limiter did not come back within 120 s: {limiter.last_error}"
    after = ray.get(limiter.actor.state.remote())
    assert after["restarted"] and after["pid"] != before["pid"]
    errors = [s for s in statuses if s[2] >= 500]
    assert not errors, f"requests failed while the limiter was down: {errors[:5]}"
    spent_granted = sum(1 for s in statuses if s[1] == "spent" and s[2] == 200)
    # The spent tenant earns SPENT_RPM / 60 tokens per second; a bucket restored full would grant SPENT_RPM at once.
    assert spent_granted <= int(window_s * SPENT_RPM / 60), (spent_granted, window_s)
    assert post("spent") == 429 or window_s * SPENT_RPM / 60 >= 1
    assert any(s[1] == "busy" and s[2] == 200 and s[3] for s in statuses), "nothing was served while degraded"
    busy_degraded = [s for s in statuses if s[1] == "busy" and s[3]]
    degraded_s = limiter.degraded_seconds()
    # While degraded this replica grants at most its share (BUSY_RPM / REPLICAS per minute) from an empty bucket.
    assert sum(1 for s in busy_degraded if s[2] == 200) <= degraded_s * BUSY_RPM / REPLICAS / 60 + 1
    assert len(limiter.outages) == 1
    fault_figure(killed="rate-limiter actor (SIGKILL of its process)", requests=len(statuses),
                 requests_failed=len(errors), requests_limited_429=sum(1 for s in statuses if s[2] == 429),
                 spent_tenant_granted=spent_granted, degraded_s=round(degraded_s, 2),
                 recovery_s=round(recovered_at - killed_at, 2), jobs_lost=0, jobs_duplicated=0)
