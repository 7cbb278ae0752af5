"""The HTTP front door: a FastAPI app that authenticates, validates, rate-limits, resolves the adapter on the
server, and hands the work to the generator. `serve.app` wraps it in the `Ingress` deployment; it has no Ray
import of its own, so it also runs under a plain ASGI server with any `generate` function.

Order of checks on a generate route, and the status of each: body size (413) → JSON (400) → API key (401)
→ fields (422, naming the field; FastAPI body models, so /docs shows them) → the tenant's generations in
flight (429 with Retry-After past `serve.max_generations_per_tenant`; 503 past `serve.max_generations`) → adapter reference (404 for a missing one and for another tenant's,
alike) → the tenant's generate rate (429 with Retry-After) → the generator (422 for a size outside the base's
range or a prompt it cannot encode, 409 for an adapter that fails verification, 504 on timeout). Invalid
requests never cost quota: the registry look-up and the rate check run at the same time (they are two
round trips, to the database and to the shared limiter), and a token taken for a request that is then
refused before any image is made — by the look-up, by the generator (`Refusal.work_spent` false), or because
no generator replica answered — is given back.

The adapter reaches the generator only as `multiplexed_model_id=<adapter version id>`, set here on every
call from the registry's answer; a `serve_multiplexed_model_id` header a client sends routes nothing.
The registry is asked on every request, so a deleted adapter stops being served at once and a newly
published version is served at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from causalt2i.generation import MAX_SEED, GenerationRequest
from cluster.api import control_plane_router
from cluster.auth import Principal, bearer_token
from cluster.http import (
    ERROR_RESPONSES, UNAVAILABLE_RESPONSES, BodyLimit, HTTPProblem, SafeJSONRoute, ServerFault, error_response,
    install_error_handlers, schema_ref,
)
from cluster.schemas import AdapterView, TenantView
from cluster.service import ControlPlane, NotFound, ServiceError
from cluster.slots import RequestSlots
from serve.metrics import IngressMetrics
from serve.schemas import (
    BASE_MODEL_REF, AdapterRef, GenerateBody, GenerateCall, GeneratedImages, GenerateOutcome, GenerateResponse, ImageDatum,
    ImagesBody, ImagesResponse, ModelEntry, ModelList, Refusal,
)

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 300.0
GENERATE_PATHS = ("/v1/generate", "/v1/images/generations")
OPENAI_PATHS = frozenset({"/v1/images/generations", "/v1/models"})
ADAPTER_ID = re.compile(r"^ad-[0-9a-f]{4,64}$")
REF = re.compile(r"^(?:(?P<tenant>[a-z0-9-]{1,40})/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<version>\d{1,9}))?$")

GenerateFn = Callable[[str, GenerateCall], Awaitable[GenerateOutcome]]
"""(multiplexed model id, call) → outcome: the generator deployment's `generate`, routed by adapter version id."""


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]


class RateLimiter(Protocol):
    async def acquire(self, tenant: str, per_minute: int) -> float:
        """0 when the request may run now; else the seconds until it could (it is not admitted)."""

    async def refund(self, tenant: str, per_minute: int) -> None:
        """Give back a token `acquire` granted to a request that was then refused for another reason."""


class TokenBuckets:
    """A token bucket per tenant: capacity `per_minute` (the burst), refilled at `per_minute / 60` per second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, empty_as_of: float | None = None):
        """`empty_as_of`: every bucket starts empty as of that time (and refills at its rate from then) instead of
        full. A limiter rebuilt after a crash does not know what each tenant spent before it: starting full would
        hand every tenant a fresh burst, a limited one included; starting empty grants nothing it cannot account
        for, and a tenant first seen a minute later finds its bucket full again."""
        self.clock = clock
        self.empty_as_of = empty_as_of
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant → (tokens, as of)
        self._lock = threading.Lock()

    def _fresh(self, per_minute: float, now: float) -> tuple[float, float]:
        return (float(per_minute), now) if self.empty_as_of is None else (0.0, self.empty_as_of)

    def take(self, tenant: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 60.0
        now = self.clock()
        rate = per_minute / 60.0
        capacity = max(1.0, float(per_minute))  # a fallback's share of a small rate still admits one request
        with self._lock:
            tokens, at = self._buckets.get(tenant) or self._fresh(capacity, now)
            tokens = min(capacity, tokens + max(0.0, now - at) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate

    def remaining(self, tenant: str, per_minute: int) -> float:
        """Tokens `tenant` has now (what `X-RateLimit-Remaining`-style reporting and the tests read)."""
        now = self.clock()
        capacity = max(1.0, float(per_minute))
        with self._lock:
            tokens, at = self._buckets.get(tenant) or self._fresh(capacity, now)
        return min(capacity, tokens + max(0.0, now - at) * per_minute / 60.0)

    def give_back(self, tenant: str, per_minute: int) -> None:
        with self._lock:
            if tenant in self._buckets:
                tokens, at = self._buckets[tenant]
                self._buckets[tenant] = (min(max(1.0, float(per_minute)), tokens + 1.0), at)


class LocalRateLimiter:
    """Per-process buckets: right for one ingress process. Serve shares one `TokenBuckets` actor instead."""

    def __init__(self, buckets: TokenBuckets | None = None):
        self.buckets = buckets or TokenBuckets()

    async def acquire(self, tenant: str, per_minute: int) -> float:
        return self.buckets.take(tenant, per_minute)

    async def refund(self, tenant: str, per_minute: int) -> None:
        self.buckets.give_back(tenant, per_minute)


class FailoverRateLimiter:
    """A shared limiter (one bucket per tenant for every ingress replica) that a fault of its own never turns into
    errors for every tenant.

    Each call to `shared` is bounded by `call_timeout_s`. When one fails or times out (the limiter actor was
    killed, is restarting, or is unreachable), this replica goes *degraded*: it limits on local buckets that
    start empty and refill at this replica's share of the tenant's rate (`per_minute / replicas()`), so the
    replicas together never grant more than the tenant's rate and a tenant that had spent its quota gets no
    fresh burst. A background probe (`probe`, every `probe_interval_s`) returns the replica to `shared` once
    it answers. Refunds never raise: a lost refund costs a tenant one token, never a request.
    `outages` holds (start, end) of each degraded spell on the `clock`; `degraded_seconds()` sums them."""

    def __init__(self, shared: RateLimiter, *, probe: Callable[[], Awaitable[Any]], replicas: Callable[[], int] = lambda: 1,
                 call_timeout_s: float = 1.0, probe_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.shared = shared
        self.probe = probe
        self.replicas = replicas
        self.call_timeout_s = call_timeout_s
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.degraded_since: float | None = None
        self.last_error: str | None = None
        self.outages: list[tuple[float, float | None]] = []
        self.local = TokenBuckets(clock)
        self._prober: asyncio.Task | None = None

    @property
    def degraded(self) -> bool:
        return self.degraded_since is not None

    def degraded_seconds(self) -> float:
        now = self.clock()
        return sum((end if end is not None else now) - start for start, end in self.outages)

    def _share(self, per_minute: int) -> float:
        return per_minute / max(1, int(self.replicas() or 1))

    def _degrade(self, err: BaseException) -> None:
        self.last_error = f"{type(err).__name__}: {err}"[:300]
        if self.degraded_since is None:
            self.degraded_since = self.clock()
            self.outages.append((self.degraded_since, None))
            self.local = TokenBuckets(self.clock, empty_as_of=self.degraded_since)
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while self.degraded_since is not None:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await asyncio.wait_for(self.probe(), timeout=max(self.call_timeout_s, 5.0))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # still down: keep limiting locally
                self.last_error = f"{type(err).__name__}: {err}"[:300]
                continue
            self.outages[-1] = (self.degraded_since, self.clock())
            self.degraded_since = None

    async def acquire(self, tenant: str, per_minute: int) -> float:
        if self.degraded_since is None:
            try:
                return await asyncio.wait_for(self.shared.acquire(tenant, per_minute), timeout=self.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._degrade(err)
        return self.local.take(tenant, self._share(per_minute))

    async def refund(self, tenant: str, per_minute: int) -> None:
        if self.degraded_since is not None:
            self.local.give_back(tenant, self._share(per_minute))
            return
        try:
            await asyncio.wait_for(self.shared.refund(tenant, per_minute), timeout=self.call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._degrade(err)


def resolve_adapter(plane: ControlPlane, tenant: str, reference: str, field: str = "adapter") -> AdapterView | None:
    """The registry's adapter version for `reference` as seen by `tenant`; None for `base`.

    Another tenant's adapter raises the same NotFound as a missing one, so a tenant cannot probe for names.
    """
    if reference == BASE_MODEL_REF:
        return None
    if ADAPTER_ID.fullmatch(reference):
        try:
            return plane.resolve_adapter_for_use(tenant, reference)
        except NotFound:
            raise NotFound(f"no adapter {reference!r}", field) from None
    match = REF.fullmatch(reference)
    if match is None:
        raise ServiceError(f"{reference!r} is not an adapter reference; use tenant/name[@version], an adapter id, or base", field)
    owner, name, version = match.group("tenant"), match.group("name"), match.group("version")
    missing = NotFound(f"no adapter {reference!r}", field)
    if owner is not None and owner != tenant:
        raise missing
    versions = plane.list_adapters(tenant, name=name)
    if version is not None:
        versions = [v for v in versions if v.version == int(version)]
    if not versions:
        raise missing
    return max(versions, key=lambda v: v.version)


def _timing_headers(outcome: GeneratedImages, seed: int, adapter: AdapterView | None, ingress: dict[str, float]) -> dict[str, str]:
    """`Server-Timing` and `X-CT2I-Time-<phase>` (seconds): the generator's phases, then the ingress's own
    (`ingress-` prefixed: key check, registry look-up, rate limit, the generator call's round trip)."""
    phases = {**outcome.timings, **{f"ingress-{name}": seconds for name, seconds in ingress.items()}}
    timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in phases.items())
    headers = {"Server-Timing": timing, "X-CT2I-Seed": str(seed), "X-CT2I-Batch-Size": str(outcome.batch_size),
               "X-CT2I-Adapter": adapter.id if adapter is not None else BASE_MODEL_REF}
    for name, seconds in phases.items():
        headers[f"X-CT2I-Time-{name.capitalize()}"] = f"{seconds:.4f}"
    return headers


@dataclass(frozen=True)
class TenantCaller:
    """Who is generating: the API key's tenant and that tenant's generate rate limit (requests per minute)."""

    tenant: str
    generate_rpm: int
    phases: dict[str, float] = field(default_factory=dict)  # seconds the ingress spent, by phase (Server-Timing)


def _checked_principal(found: Principal | None) -> Principal:
    if found is None:
        raise HTTPProblem(401, "authorization", "missing, unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
    if found.tenant is None:
        raise HTTPProblem(403, "authorization", "generating needs a tenant's key: an admin key has no adapters or quota")
    return found


def create_ingress_app(plane: ControlPlane, generate: GenerateFn, *, limiter: RateLimiter | None = None,
                       metrics: IngressMetrics | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                       request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, slots: RequestSlots | None = None) -> FastAPI:
    """The ingress app: the generate routes, and the control plane's router included, so /v1/tunings,
    /v1/adapters, /v1/admin/... answer on the same port and appear in the one generated OpenAPI document.
    `slots` caps each tenant's (and everyone's) open event streams and generate calls in flight (default: from
    `plane.settings.serve`)."""
    limiter = limiter or LocalRateLimiter()
    slots = slots or RequestSlots.from_settings(plane.settings.serve)
    metrics = metrics or IngressMetrics()
    app = FastAPI(title="CausalT2I", version="1",
                  description="Generate images with your tuned adapters; tune, list and delete them. "
                              "Authenticate with `Authorization: Bearer <API key>`.")
    app.state.plane = plane
    app.add_middleware(BodyLimit, default=plane.settings.limits.max_request_bytes,
                       limits={path: max_body_bytes for path in GENERATE_PATHS})
    install_error_handlers(app, openai_paths=OPENAI_PATHS)

    @app.middleware("http")
    async def count_generate_requests(request: Request, call_next):
        if request.url.path not in GENERATE_PATHS:
            return await call_next(request)
        started = time.perf_counter()
        response = await call_next(request)
        route = "images" if request.url.path.endswith("generations") else "generate"
        metrics.request(route, response.status_code, getattr(request.state, "tenant", ""), time.perf_counter() - started)
        return response

    async def principal(request: Request) -> Principal:
        return _checked_principal(await run_in_threadpool(plane.authenticate, bearer_token(request.headers.get("authorization"))))

    async def tenant_caller(request: Request) -> TenantCaller:
        """The key's tenant and its generate quota, read in one trip to a worker thread."""
        started = time.perf_counter()
        secret = bearer_token(request.headers.get("authorization"))

        def read() -> tuple[Principal | None, TenantView | None]:
            found = plane.authenticate(secret)
            if found is None or found.tenant is None:
                return found, None
            try:
                return found, plane.get_tenant(found.tenant)
            except NotFound:
                return None, None

        found, tenant = await run_in_threadpool(read)
        checked = _checked_principal(found)
        request.state.tenant = checked.tenant
        return TenantCaller(checked.tenant, tenant.generate_rpm, {"auth": time.perf_counter() - started})

    async def run(who: TenantCaller, reference: str, field: str, request: GenerationRequest) -> tuple[GeneratedImages, AdapterView | None]:
        # A generation slot before anything else: past the tenant's cap the refusal is immediate and costs no token.
        with slots.generations.acquire(who.tenant):
            return await run_in_slot(who, reference, field, request)

    async def run_in_slot(who: TenantCaller, reference: str, field: str, request: GenerationRequest) -> tuple[GeneratedImages, AdapterView | None]:
        phases = who.phases
        started = time.perf_counter()
        per_minute = who.generate_rpm
        rate = asyncio.ensure_future(limiter.acquire(who.tenant, per_minute))
        try:
            adapter = await run_in_threadpool(resolve_adapter, plane, who.tenant, reference, field)
        except BaseException as err:
            if await rate == 0:
                await limiter.refund(who.tenant, per_minute)
            if isinstance(err, ServiceError):
                raise HTTPProblem(err.status, err.field or field, err.message) from None
            raise
        phases["lookup"] = time.perf_counter() - started
        wait = await rate
        phases["rate"] = time.perf_counter() - started - phases["lookup"]  # what the rate check added after the look-up
        if wait > 0:
            raise HTTPProblem(429, "tenant.generate_rpm", f"over {per_minute} generate requests per minute; retry in {wait:.1f} s",
                              {"Retry-After": str(max(1, math.ceil(wait)))})
        model_id = adapter.id if adapter is not None else BASE_MODEL_REF
        call = GenerateCall(request=request, tenant=who.tenant, deadline=time.time() + request_timeout_s)
        started = time.perf_counter()
        try:
            outcome = await asyncio.wait_for(generate(model_id, call), timeout=request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPProblem(504, "request", f"not finished within {request_timeout_s:g} s") from None
        except HTTPProblem:
            raise
        except Exception as err:  # the replica died or is being replaced: the client may retry, at no cost
            await limiter.refund(who.tenant, per_minute)
            raise ServerFault(f"generator call failed: {err!r}", status=503, public="the generator is unavailable; retry",
                              headers={"Retry-After": "5"}) from err
        phases["generator"] = time.perf_counter() - started
        if isinstance(outcome, Refusal):
            if not outcome.work_spent:  # refused before any image was made: the request costs nothing
                await limiter.refund(who.tenant, per_minute)
            raise HTTPProblem(outcome.status, field if outcome.field == "adapter" else outcome.field, outcome.message)
        return outcome, adapter

    def generation_request(body, width: int | None, height: int | None) -> GenerationRequest:
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if seed + body.n - 1 > MAX_SEED:
            raise HTTPProblem(422, "seed", f"seed + n - 1 must be at most {MAX_SEED}")
        return GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                                 guidance=body.guidance_scale, width=width, height=height, n=body.n, seed=seed)

    generate_routes = APIRouter(route_class=SafeJSONRoute, tags=["generate"], responses={**ERROR_RESPONSES, **UNAVAILABLE_RESPONSES})

    @generate_routes.post("/v1/generate", summary="Generate images with one of your adapters (or the base)",
                          response_class=Response,
                          responses={200: {"content": {"image/png": {}, "application/json": {"schema": schema_ref(GenerateResponse)}},
                                           "description": "`format: png`: the image; `format: json`: base64 images, seeds and timings"}})
    async def generate_route(body: GenerateBody, who: TenantCaller = Depends(tenant_caller)) -> Response:
        if body.format == "png" and body.n > 1:
            raise HTTPProblem(422, "format", "`png` returns one image; ask for `json` to get n > 1 images")
        generation = generation_request(body, body.width, body.height)
        outcome, adapter = await run(who, body.adapter, "adapter", generation)
        headers = _timing_headers(outcome, generation.seed, adapter, who.phases)
        if body.format == "png":
            return Response(outcome.pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            images=[base64.b64encode(png).decode() for png in outcome.pngs], seeds=outcome.seeds, seed=generation.seed,
            width=outcome.width, height=outcome.height, timings=outcome.timings,
            adapter=AdapterRef(id=adapter.id, tenant=adapter.tenant, name=adapter.name, version=adapter.version) if adapter else None)
        return JSONResponse(payload.model_dump(), headers=headers)

    @generate_routes.post("/v1/images/generations", summary="OpenAI Images API compatible generation",
                          response_model=ImagesResponse, response_model_exclude_none=True)
    async def images_route(body: ImagesBody, who: TenantCaller = Depends(tenant_caller)):
        width, height = body.dimensions()
        generation = generation_request(body, width, height)
        outcome, adapter = await run(who, body.model, "model", generation)
        payload = ImagesResponse(created=int(time.time()), data=[ImageDatum(b64_json=base64.b64encode(png).decode()) for png in outcome.pngs])
        return JSONResponse(payload.model_dump(exclude_none=True), headers=_timing_headers(outcome, generation.seed, adapter, who.phases))

    @generate_routes.get("/v1/models", summary="OpenAI-style list of the models you can generate with", response_model=ModelList)
    async def list_models(who: Principal = Depends(principal)):
        adapters = await run_in_threadpool(plane.list_adapters, who.tenant)
        models = [ModelEntry(id=BASE_MODEL_REF, created=0, owned_by="ct2i")]
        models += [ModelEntry(id=f"{a.tenant}/{a.name}@{a.version}", created=int(a.created_at), owned_by=a.tenant) for a in adapters]
        return ModelList(data=models)

    app.include_router(generate_routes)
    app.include_router(control_plane_router(plane, stream_slots=slots.streams))

    @app.get("/healthz", tags=["operations"], summary="liveness: the ingress answers and its database is reachable",
             response_model=Health, responses={503: {"model": Health, "description": "the database is unreachable"}})
    async def healthz():
        """Healthy or not, and nothing else: this route needs no key, so it tells no one about traffic or
        internals (request counters are on the metrics endpoint; a fault is logged server-side)."""
        try:
            await run_in_threadpool(plane.authenticate, None)
            await run_in_threadpool(plane.list_tenants)
        except Exception:
            logging.getLogger("ct2i.ingress").exception("healthz: the database is unreachable")
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return Health(status="ok")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web_file(name: str):
        path = WEB_DIR / name
        if not re.fullmatch(r"[a-z0-9_-]+\.(js|css|html)", name) or not path.is_file():
            return error_response(404, "name", "no such file")
        return FileResponse(path)

    return app


