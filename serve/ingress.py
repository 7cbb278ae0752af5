"""The HTTP front door: a FastAPI app that authenticates, validates, rate-limits, resolves the adapter on the
server, and hands the work to the generator. `serve.app` wraps it in the `Ingress` deployment; it has no Ray
import of its own, so it also runs under a plain ASGI server with any `generate` function.

Order of checks on a generate route, and the status of each: API key (401) → body size (413) → JSON (400)
→ fields (422, naming the field) → adapter reference (404 for a missing one and for another tenant's,
alike) → the tenant's generate rate (429 with Retry-After) → the generator (422 for a size outside the base's
range or a prompt it cannot encode, 409 for an adapter that fails verification, 504 on timeout). Invalid
requests never cost quota: the registry look-up and the rate check run at the same time (they are two
round trips, to the database and to the shared limiter), and a token taken for a request the look-up then
refuses is given back.

The adapter reaches the generator only as `multiplexed_model_id=<adapter version id>`, set here on every
call from the registry's answer; a `serve_multiplexed_model_id` header a client sends routes nothing.
The registry is asked on every request, so a deleted adapter stops being served at once and a newly
published version is served at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from causalt2i.generation import MAX_SEED, GenerationRequest
from cluster.auth import Principal, bearer_token
from cluster.schemas import AdapterView, TenantView
from cluster.service import ControlPlane, NotFound, ServiceError
from serve.metrics import IngressMetrics
from serve.schemas import (
    BASE_MODEL_REF, AdapterRef, GenerateBody, GenerateCall, GeneratedImages, GenerateOutcome, GenerateResponse, ImageDatum,
    ImagesBody, ImagesResponse, Refusal,
)

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 300.0
ADAPTER_ID = re.compile(r"^ad-[0-9a-f]{4,64}$")
REF = re.compile(r"^(?:(?P<tenant>[a-z0-9-]{1,40})/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<version>\d{1,9}))?$")

GenerateFn = Callable[[str, GenerateCall], Awaitable[GenerateOutcome]]
"""(multiplexed model id, call) → outcome: the generator deployment's `generate`, routed by adapter version id."""


class RateLimiter(Protocol):
    async def acquire(self, tenant: str, per_minute: int) -> float:
        """0 when the request may run now; else the seconds until it could (it is not admitted)."""

    async def refund(self, tenant: str, per_minute: int) -> None:
        """Give back a token `acquire` granted to a request that was then refused for another reason."""


class TokenBuckets:
    """A token bucket per tenant: capacity `per_minute` (the burst), refilled at `per_minute / 60` per second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant → (tokens, as of)
        self._lock = threading.Lock()

    def take(self, tenant: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 60.0
        now = self.clock()
        rate = per_minute / 60.0
        with self._lock:
            tokens, at = self._buckets.get(tenant, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate

    def give_back(self, tenant: str, per_minute: int) -> None:
        with self._lock:
            if tenant in self._buckets:
                tokens, at = self._buckets[tenant]
                self._buckets[tenant] = (min(float(per_minute), tokens + 1.0), at)


class LocalRateLimiter:
    """Per-process buckets: right for one ingress process. Serve shares one `TokenBuckets` actor instead."""

    def __init__(self, buckets: TokenBuckets | None = None):
        self.buckets = buckets or TokenBuckets()

    async def acquire(self, tenant: str, per_minute: int) -> float:
        return self.buckets.take(tenant, per_minute)

    async def refund(self, tenant: str, per_minute: int) -> None:
        self.buckets.give_back(tenant, per_minute)


class HTTPProblem(Exception):
    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}
        super().__init__(f"{status} {field}: {message}")


def _validation_problem(err: ValidationError) -> HTTPProblem:
    problem = err.errors(include_url=False)[0]
    field = ".".join(str(part) for part in problem.get("loc", ())) or "body"
    message = problem.get("msg", "invalid").removeprefix("Value error, ")
    if problem.get("type") == "extra_forbidden":
        message = "unknown field"
    elif "input" in problem and problem.get("type") not in ("missing", "value_error"):
        message = f"{message} (got {problem['input']!r})"[:500]
    return HTTPProblem(422, field, message)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (by Content-Length, or while streaming), 400 when not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "body", f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, "body", f"request body over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPProblem(400, "body", f"malformed JSON: {err}") from None


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


def _merged_openapi(app: FastAPI, control_app: FastAPI | None) -> Callable[[], dict]:
    own = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = own()
        if control_app is not None:
            other = control_app.openapi()
            schema.setdefault("paths", {}).update({p: v for p, v in other.get("paths", {}).items() if p not in schema["paths"]})
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, value in other.get("components", {}).get("schemas", {}).items():
                components.setdefault(name, value)
        app.openapi_schema = schema
        return schema

    return openapi


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


def _checked_principal(found: Principal | None) -> Principal:
    if found is None:
        raise HTTPProblem(401, "authorization", "missing, unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
    if found.tenant is None:
        raise HTTPProblem(403, "authorization", "generating needs a tenant's key: an admin key has no adapters or quota")
    return found


def create_ingress_app(plane: ControlPlane, generate: GenerateFn, *, limiter: RateLimiter | None = None,
                       metrics: IngressMetrics | None = None, control_app: FastAPI | None = None,
                       max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                       request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> FastAPI:
    """The ingress app. `control_app` (cluster.api.create_app) is mounted under it, so /v1/tunings, /v1/adapters,
    /v1/admin/... answer on the same port; its routes also appear in this app's OpenAPI page at /docs."""
    limiter = limiter or LocalRateLimiter()
    metrics = metrics or IngressMetrics()
    app = FastAPI(title="CausalT2I", version="1",
                  description="Generate images with your tuned adapters; tune, list and delete them. "
                              "Authenticate with `Authorization: Bearer <API key>`.")
    app.state.plane = plane

    async def principal(request: Request) -> Principal:
        return _checked_principal(await run_in_threadpool(plane.authenticate, bearer_token(request.headers.get("authorization"))))

    async def tenant_caller(request: Request) -> TenantCaller:
        """The key's tenant and its generate quota, read in one trip to a worker thread."""
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
        return TenantCaller(checked.tenant, tenant.generate_rpm)

    async def run(who: TenantCaller, reference: str, field: str, request: GenerationRequest,
                  phases: dict[str, float]) -> tuple[GeneratedImages, AdapterView | None]:
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
        except Exception as err:  # the replica died or is being replaced: the client may retry
            raise HTTPProblem(503, "request", f"the generator is unavailable ({type(err).__name__}); retry",
                              {"Retry-After": "5"}) from None
        phases["generator"] = time.perf_counter() - started
        if isinstance(outcome, Refusal):
            raise HTTPProblem(outcome.status, field if outcome.field == "adapter" else outcome.field, outcome.message)
        return outcome, adapter

    def generation_request(body, width: int | None, height: int | None) -> GenerationRequest:
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if seed + body.n - 1 > MAX_SEED:
            raise HTTPProblem(422, "seed", f"seed + n - 1 must be at most {MAX_SEED}")
        return GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                                 guidance=body.guidance_scale, width=width, height=height, n=body.n, seed=seed)

    def timed(route: str, handler):
        async def endpoint(request: Request):
            started = time.perf_counter()
            tenant = ""
            try:
                who = await tenant_caller(request)
                tenant = who.tenant
                response = await handler(request, who, {"auth": time.perf_counter() - started})
            except HTTPProblem as problem:
                response = (_openai_error if route == "images" else _error)(problem)
            metrics.request(route, response.status_code, tenant, time.perf_counter() - started)
            return response

        return endpoint

    async def generate_route(request: Request, who: TenantCaller, phases: dict[str, float]) -> Response:
        try:
            body = GenerateBody.model_validate(await read_json(request, max_body_bytes))
        except ValidationError as err:
            raise _validation_problem(err) from None
        if body.format == "png" and body.n > 1:
            raise HTTPProblem(422, "format", "`png` returns one image; ask for `json` to get n > 1 images")
        generation = generation_request(body, body.width, body.height)
        outcome, adapter = await run(who, body.adapter, "adapter", generation, phases)
        headers = _timing_headers(outcome, generation.seed, adapter, phases)
        if body.format == "png":
            return Response(outcome.pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            images=[base64.b64encode(png).decode() for png in outcome.pngs], seeds=outcome.seeds, seed=generation.seed,
            width=outcome.width, height=outcome.height, timings=outcome.timings,
            adapter=AdapterRef(id=adapter.id, tenant=adapter.tenant, name=adapter.name, version=adapter.version) if adapter else None)
        return JSONResponse(payload.model_dump(), headers=headers)

    async def images_route(request: Request, who: TenantCaller, phases: dict[str, float]) -> Response:
        try:
            body = ImagesBody.model_validate(await read_json(request, max_body_bytes))
        except ValidationError as err:
            raise _validation_problem(err) from None
        width, height = body.dimensions()
        generation = generation_request(body, width, height)
        outcome, adapter = await run(who, body.model, "model", generation, phases)
        payload = ImagesResponse(created=int(time.time()), data=[ImageDatum(b64_json=base64.b64encode(png).decode()) for png in outcome.pngs])
        return JSONResponse(payload.model_dump(exclude_none=True), headers=_timing_headers(outcome, generation.seed, adapter, phases))

    app.add_api_route("/v1/generate", timed("generate", generate_route), methods=["POST"], tags=["generate"],
                      summary="Generate images with one of your adapters (or the base)",
                      response_class=Response,
                      responses={200: {"content": {"image/png": {}, "application/json": {"schema": GenerateResponse.model_json_schema()}},
                                       "description": "`format: png`: the image; `format: json`: base64 images, seeds and timings"}},
                      openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateBody.model_json_schema()}}}})
    app.add_api_route("/v1/images/generations", timed("images", images_route), methods=["POST"], tags=["generate"],
                      summary="OpenAI Images API compatible generation",
                      response_class=JSONResponse,
                      responses={200: {"content": {"application/json": {"schema": ImagesResponse.model_json_schema()}}}},
                      openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": ImagesBody.model_json_schema()}}}})

    @app.get("/v1/models", tags=["generate"], summary="OpenAI-style list of the models you can generate with")
    async def list_models(request: Request):
        try:
            who = await principal(request)
        except HTTPProblem as problem:
            return _openai_error(problem)
        adapters = await run_in_threadpool(plane.list_adapters, who.tenant)
        models = [{"id": BASE_MODEL_REF, "object": "model", "created": 0, "owned_by": "ct2i"}]
        models += [{"id": f"{a.tenant}/{a.name}@{a.version}", "object": "model", "created": int(a.created_at), "owned_by": a.tenant}
                   for a in adapters]
        return {"object": "list", "data": models}

    @app.get("/healthz", tags=["operations"], summary="liveness: the ingress answers and its database is reachable")
    async def healthz():
        try:
            await run_in_threadpool(plane.authenticate, None)
            await run_in_threadpool(plane.list_tenants)
        except Exception as err:
            return JSONResponse({"status": "degraded", "database": f"{type(err).__name__}"}, status_code=503)
        return {"status": "ok", "requests": metrics.snapshot()}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web_file(name: str):
        path = WEB_DIR / name
        if not re.fullmatch(r"[a-z0-9_-]+\.(js|css|html)", name) or not path.is_file():
            return _error(HTTPProblem(404, "name", "no such file"))
        return FileResponse(path)

    app.openapi = _merged_openapi(app, control_app)  # type: ignore[method-assign]
    if control_app is not None:
        app.mount("/", control_app)
    return app


def _error(problem: HTTPProblem) -> JSONResponse:
    return JSONResponse({"detail": {"field": problem.field, "message": problem.message}}, status_code=problem.status,
                        headers=problem.headers)


def _openai_error(problem: HTTPProblem) -> JSONResponse:
    """The error shape OpenAI clients parse (`openai.APIStatusError.body`), plus our `detail`."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        problem.status, "invalid_request_error" if problem.status < 500 else "server_error")
    body = {"error": {"message": problem.message, "type": kind, "param": problem.field, "code": str(problem.status)},
            "detail": {"field": problem.field, "message": problem.message}}
    return JSONResponse(body, status_code=problem.status, headers=problem.headers)
