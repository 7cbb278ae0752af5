"""The Serve application: `Ingress` (FastAPI, CPU) in front of `Generator` (one base per replica, GPU).

`serve run serve/config.yaml` / `serve deploy` / the RayService import `serve.app:app`; `serve/config.yaml`
carries replicas, autoscaling and resources and overrides the defaults below. `ct2i serve` and the tests
call `build_app(...)` with their own settings and sizes.

Everything the replicas need comes from their arguments or, when those are None, from the environment the
pods set (CT2I_HOME / CT2I_DATABASE_URL / CT2I_ARTIFACTS for the control plane, CT2I_BASE_MODEL for the base),
so this module builds the same application on every cluster.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ControlPlaneSettings
from serve.generator import (
    DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, DEFAULT_REQUEST_TIMEOUT_S, GeneratorReplica,
)
from serve.ingress import DEFAULT_MAX_BODY_BYTES, TokenBuckets

RATE_LIMITER_NAME = "ct2i-generate-rate"

# Two batches' worth of requests per replica: one running, the next one filling behind it.
Generator = serve.deployment(name="Generator", max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
                             ray_actor_options={"num_cpus": 1})(GeneratorReplica)


class _SharedBuckets:
    """One token bucket per tenant for every ingress replica: the limit is per tenant, not per replica."""

    def __init__(self):
        self.buckets = TokenBuckets()

    def take(self, tenant: str, per_minute: int) -> float:
        return self.buckets.take(tenant, per_minute)

    def give_back(self, tenant: str, per_minute: int) -> None:
        self.buckets.give_back(tenant, per_minute)

    def ready(self) -> bool:
        return True


class ActorRateLimiter:
    """`serve.ingress.RateLimiter` backed by a named Ray actor that every ingress replica shares."""

    def __init__(self, namespace: str):
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=-1)(_SharedBuckets)
        self.actor = actor.options(name=RATE_LIMITER_NAME, namespace=namespace, get_if_exists=True,
                                   lifetime="detached").remote()
        # The first replica starts the actor (a new worker process: seconds on a busy node). Waiting here keeps
        # that out of the first requests: Serve routes nothing to a replica whose constructor has not returned.
        ray.get(self.actor.ready.remote(), timeout=300)

    async def acquire(self, tenant: str, per_minute: int) -> float:
        return await self.actor.take.remote(tenant, per_minute)

    async def refund(self, tenant: str, per_minute: int) -> None:
        await self.actor.give_back.remote(tenant, per_minute)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    def __init__(self, generator, settings: dict | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        from cluster.api import create_app
        from cluster.service import ControlPlane
        from serve.metrics import IngressMetrics

        plane_settings = ControlPlaneSettings(**settings) if settings else ControlPlaneSettings.from_env()
        self.plane = ControlPlane.open(plane_settings)
        self.generator = generator
        self.metrics = IngressMetrics()
        self.limiter = ActorRateLimiter(plane_settings.ray_namespace)
        self.control_app = create_app(plane=self.plane)
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s

    async def _generate(self, model_id: str, call):
        # The multiplexed id is set here, from the registry's answer, on every call: whatever a client put in a
        # `serve_multiplexed_model_id` header only tagged its request to this (unmultiplexed) ingress.
        return await self.generator.options(multiplexed_model_id=model_id).generate.remote(call)

    def __serve_build_asgi_app__(self):
        from serve.ingress import create_ingress_app

        return create_ingress_app(self.plane, self._generate, limiter=self.limiter, metrics=self.metrics,
                                  control_app=self.control_app, max_body_bytes=self.max_body_bytes,
                                  request_timeout_s=self.request_timeout_s)


def build_app(settings: ControlPlaneSettings | None = None, *, base_model: str | None = None, cache_bytes: int | None = None,
              max_adapters: int | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
              batch_wait_s: float = DEFAULT_BATCH_WAIT_S, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, generator_options: dict[str, Any] | None = None,
              ingress_options: dict[str, Any] | None = None) -> Application:
    """The application graph. `settings` None: each replica reads the control plane's settings from its environment."""
    settings_json = settings.model_dump(mode="json") if settings is not None else None
    generator = Generator.options(**(generator_options or {})).bind(
        settings_json, base_model=base_model, cache_bytes=cache_bytes, max_adapters=max_adapters,
        max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, request_timeout_s=request_timeout_s)
    return Ingress.options(**(ingress_options or {})).bind(generator, settings_json, max_body_bytes=max_body_bytes,
                                                           request_timeout_s=request_timeout_s)


app = build_app()
