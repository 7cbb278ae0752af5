"""The Serve application: `Ingress` (FastAPI, CPU) in front of `Generator` (one base per replica, GPU).

`serve run serve/config.yaml` / `serve deploy` / the RayService import `serve.app:app`; `serve/config.yaml`
carries replicas, autoscaling and resources and overrides the defaults below. `ct2i serve` and the tests
call `build_app(...)` with their own settings and sizes.

Everything the replicas need comes from their arguments or, when those are None, from the settings the
pods' environment gives (`cluster.config.ControlPlaneSettings`: CT2I_HOME / CT2I_DATABASE_URL / CT2I_ARTIFACTS
for the control plane, CT2I_BASE_MODEL for the base, CT2I_SERVE__* for the generator's cache), so this module
builds the same application on every cluster.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ControlPlaneSettings
from serve.generator import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, GeneratorReplica
from serve.ingress import FailoverRateLimiter, TokenBuckets

RATE_LIMITER_NAME = "ct2i-generate-rate"

# Two batches' worth of requests per replica: one running, the next one filling behind it.
Generator = serve.deployment(name="Generator", max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
                             ray_actor_options={"num_cpus": 1})(GeneratorReplica)


class _SharedBuckets:
    """One token bucket per tenant for every ingress replica: the limit is per tenant, not per replica.

    Ray restarts the actor when its process dies (`max_restarts=-1`). A restarted one cannot know what each
    tenant spent before the crash, so it is rebuilt conservatively: every bucket starts empty (refilling at its
    rate from the restart), never full, and a tenant that had spent its quota stays limited."""

    def __init__(self):
        import ray

        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.buckets = TokenBuckets(empty_as_of=time.monotonic() if self.restarted else None)

    def take(self, tenant: str, per_minute: int) -> float:
        return self.buckets.take(tenant, per_minute)

    def give_back(self, tenant: str, per_minute: int) -> None:
        self.buckets.give_back(tenant, per_minute)

    def remaining(self, tenant: str, per_minute: int) -> float:
        return self.buckets.remaining(tenant, per_minute)

    def state(self) -> dict:
        return {"pid": os.getpid(), "restarted": self.restarted}

    def ready(self) -> bool:
        return True


class _ActorBuckets:
    """The bare calls to the limiter actor (no fault handling: `ActorRateLimiter` adds it)."""

    def __init__(self, actor):
        self.actor = actor

    async def acquire(self, tenant: str, per_minute: int) -> float:
        return await self.actor.take.remote(tenant, per_minute)

    async def refund(self, tenant: str, per_minute: int) -> None:
        await self.actor.give_back.remote(tenant, per_minute)


INGRESS_MAX_ONGOING_REQUESTS = 128
"""Serve slots per ingress replica. The long requests are capped below it (`serve.max_streams` 64 +
`serve.max_generations` 32 by default, `cluster.slots`), so at least `INGRESS_SHORT_REQUEST_SLOTS` always remain
for GETs, submits and `/healthz`, however many streams and generations are open. The ingress is async (its
database calls run in a thread pool), so a held slot costs a coroutine, not a thread."""
INGRESS_SHORT_REQUEST_SLOTS = 16


def check_ingress_slots(serve_settings, max_ongoing_requests: int) -> None:
    """Refuse a deployment whose long-request caps could take every Serve slot (then a GET or /healthz would
    queue behind the streams, as they did when Serve's default of 5 applied)."""
    from cluster.slots import RequestSlots

    long_slots = RequestSlots.from_settings(serve_settings).long_slots
    if long_slots + INGRESS_SHORT_REQUEST_SLOTS > max_ongoing_requests:
        raise ValueError(
            f"Ingress max_ongoing_requests is {max_ongoing_requests}, but serve.max_streams + serve.max_generations = "
            f"{long_slots} leaves fewer than {INGRESS_SHORT_REQUEST_SLOTS} slots for short requests and /healthz; "
            "raise max_ongoing_requests (serve/config.yaml) or lower the caps")


def _replica_max_ongoing_requests(default: int) -> int:
    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # outside a replica, or the private attribute moved: the decorator's value
        return default


def _ingress_replicas() -> int:
    """How many ingress replicas share a tenant's rate now (the deployment's world size; 1 outside Serve)."""
    try:
        return max(1, int(serve.get_replica_context().world_size or 1))
    except Exception:  # not inside a replica (tests, a plain ASGI server)
        return 1


class ActorRateLimiter(FailoverRateLimiter):
    """`serve.ingress.RateLimiter` backed by a named Ray actor that every ingress replica shares.

    While the actor is unreachable (killed, restarting) each replica limits locally at its share of the rate
    (`FailoverRateLimiter`): no request fails because the limiter did, and no tenant gets more than its rate."""

    def __init__(self, namespace: str, *, name: str = RATE_LIMITER_NAME, replicas=_ingress_replicas,
                 call_timeout_s: float = 1.0, probe_interval_s: float = 1.0):
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=-1)(_SharedBuckets)
        self.actor = actor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached").remote()
        # The first replica starts the actor (a new worker process: seconds on a busy node). Waiting here keeps
        # that out of the first requests: Serve routes nothing to a replica whose constructor has not returned.
        ray.get(self.actor.ready.remote(), timeout=300)

        async def probe() -> None:
            await self.actor.ready.remote()

        super().__init__(_ActorBuckets(self.actor), probe=probe, replicas=replicas, call_timeout_s=call_timeout_s,
                         probe_interval_s=probe_interval_s)


# graceful_shutdown_timeout_s: a replica being replaced lets its open streams and generations finish (or Serve's
# request timeout cut them) before it goes.
@serve.deployment(name="Ingress", max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    def __init__(self, generator, settings: ControlPlaneSettings | None = None):
        from cluster.api import wake_scheduler_if_reachable
        from cluster.service import ControlPlane
        from serve.metrics import IngressMetrics

        plane_settings = settings or ControlPlaneSettings()
        check_ingress_slots(plane_settings.serve, _replica_max_ongoing_requests(INGRESS_MAX_ONGOING_REQUESTS))
        self.plane = ControlPlane.open(plane_settings)
        self.plane.on_change = wake_scheduler_if_reachable(plane_settings)
        self.generator = generator
        self.metrics = IngressMetrics()
        self.limiter = ActorRateLimiter(plane_settings.ray_namespace)

    async def _generate(self, model_id: str, call):
        # The multiplexed id is set here, from the registry's answer, on every call: whatever a client put in a
        # `serve_multiplexed_model_id` header only tagged its request to this (unmultiplexed) ingress.
        return await self.generator.options(multiplexed_model_id=model_id).generate.remote(call)

    def __serve_build_asgi_app__(self):
        from serve.ingress import create_ingress_app

        serving = self.plane.settings.serve
        return create_ingress_app(self.plane, self._generate, limiter=self.limiter, metrics=self.metrics,
                                  max_body_bytes=serving.max_body_bytes, request_timeout_s=serving.request_timeout_s)


def build_app(settings: ControlPlaneSettings | None = None, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
              batch_wait_s: float = DEFAULT_BATCH_WAIT_S, generator_options: dict[str, Any] | None = None,
              ingress_options: dict[str, Any] | None = None) -> Application:
    """The application graph. `settings` None: each replica reads the platform's settings from its environment.
    The base, the adapter cache and the request limits are settings (`base_model`, `serve.*`)."""
    generator = Generator.options(**(generator_options or {})).bind(settings, max_batch_size=max_batch_size,
                                                                    batch_wait_s=batch_wait_s)
    return Ingress.options(**(ingress_options or {})).bind(generator, settings)


app = build_app()
