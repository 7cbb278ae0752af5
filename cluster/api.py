"""The REST API: FastAPI, runnable on its own (`uvicorn --factory cluster.api:create_app`) and mountable into
the Serve ingress (`app.mount("/", create_app(...))`, or include `router`). OpenAPI at /docs.

Auth is `Authorization: Bearer <key>`. A tenant key sees only its tenant: another tenant's job or adapter
answers 404 exactly like a missing one. Admin routes (`/v1/admin/...`) need an admin key.
Errors are `{"detail": {"field": ..., "message": ...}}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable

import yaml
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from cluster.auth import Principal, bearer_token
from cluster.config import ControlPlaneSettings
from cluster.schemas import (
    AdapterView, CreatedKey, JobView, KeyCreate, KeyView, Quotas, TenantCreate, TenantView, TuningRequest, UsageView,
    WebhookSet,
)
from cluster.service import ControlPlane, ServiceError
from cluster.states import TERMINAL


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": {"field": field, "message": message}})


class RequestSizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (413), by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await _error(413, "body", f"request body over {self.max_bytes} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _error(413, "body", f"request body over {self.max_bytes} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: ControlPlaneSettings | None = None, *, plane: ControlPlane | None = None,
               notify: Callable[[str], None] | None = None) -> FastAPI:
    """`notify(job_id)` is called after a submit or cancel (e.g. to wake the scheduler actor); default: find the
    actor if this process is connected to Ray, else rely on the scheduler's own polling."""
    plane = plane or ControlPlane.open(settings)
    if notify is None:
        notify = _wake_scheduler_if_reachable(plane.settings)
    plane.on_change = notify
    limits = plane.settings
    app = FastAPI(title="CausalT2I control plane", version="1", description=__doc__)
    app.add_middleware(RequestSizeLimit, max_bytes=limits.max_request_bytes)
    app.state.plane = plane

    @app.exception_handler(ServiceError)
    async def _service_error(_request, err: ServiceError):
        return _error(err.status, err.field, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        problem = err.errors()[0]
        loc = [str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path")]
        return _error(422, ".".join(loc) or "body", problem.get("msg", "invalid request"))

    async def principal(request: Request) -> Principal:
        found = await run_in_threadpool(plane.authenticate, bearer_token(request.headers.get("authorization")))
        if found is None:
            raise HTTPException(401, {"field": "authorization", "message": "missing, unknown or revoked API key"},
                                headers={"WWW-Authenticate": "Bearer"})
        return found

    async def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.is_admin:
            raise HTTPException(403, {"field": "authorization", "message": "an admin key is required"})
        return who

    def scope_of(who: Principal) -> str | None:
        return None if who.is_admin else who.tenant

    router = APIRouter(prefix="/v1")

    @router.post("/tunings", response_model=JobView, status_code=201, tags=["tunings"],
                 openapi_extra={"requestBody": {"content": {
                     "application/json": {"schema": TuningRequest.model_json_schema()},
                     "multipart/form-data": {"schema": {"type": "object", "properties": {
                         "spec": {"type": "string", "description": "the spec as JSON or YAML"},
                         "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def submit(request: Request, who: Principal = Depends(principal)) -> JobView:
        """Submit a tuning: JSON `{spec, images: {name: base64}}`, or multipart with a `spec` field plus image files."""
        spec, images = await _read_submission(request, limits.max_images_per_job)
        return await run_in_threadpool(plane.submit, scope_of(who), spec, images)

    @router.get("/tunings", response_model=list[JobView], tags=["tunings"])
    async def list_tunings(state: str | None = None, limit: int = Query(100, ge=1, le=1000),
                           who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.list_jobs, scope_of(who), state=state, limit=limit)

    @router.get("/tunings/{job_id}", response_model=JobView, tags=["tunings"])
    async def get_tuning(job_id: str, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.get_job, scope_of(who), job_id)

    @router.delete("/tunings/{job_id}", response_model=JobView, tags=["tunings"])
    async def cancel_tuning(job_id: str, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.cancel_job, scope_of(who), job_id)

    @router.get("/tunings/{job_id}/events", tags=["tunings"], response_class=StreamingResponse)
    async def tuning_events(job_id: str, request: Request, who: Principal = Depends(principal)):
        """Server-sent events: every state change, checkpoint and progress event, until the job ends."""
        tenant = scope_of(who)
        await run_in_threadpool(plane.get_job, tenant, job_id)  # 404 before the stream starts
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0

        async def stream():
            nonlocal after
            while True:
                events = await run_in_threadpool(plane.job_events, tenant, job_id, after=after)
                for event in events:
                    after = event.id
                    yield f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"
                job = await run_in_threadpool(plane.get_job, tenant, job_id)
                if job.state in TERMINAL and not events:
                    yield f"event: end\ndata: {json.dumps({'state': job.state})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                if not events:
                    yield ": keep-alive\n\n"
                    await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/adapters", response_model=list[AdapterView], tags=["adapters"])
    async def list_adapters(name: str | None = None, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.list_adapters, scope_of(who), name=name)

    @router.get("/adapters/{adapter_id}", response_model=AdapterView, tags=["adapters"])
    async def get_adapter(adapter_id: str, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.get_adapter, scope_of(who), adapter_id)

    @router.get("/adapters/{adapter_id}/files/{filename}", tags=["adapters"], response_class=Response)
    async def download_adapter_file(adapter_id: str, filename: str, who: Principal = Depends(principal)):
        """A file of the adapter (adapter.safetensors, manifest.json), sha256-verified before it is sent."""
        data = await run_in_threadpool(plane.adapter_file, scope_of(who), adapter_id, filename)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @router.delete("/adapters/{adapter_id}", response_model=AdapterView, tags=["adapters"])
    async def delete_adapter(adapter_id: str, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.delete_adapter, scope_of(who), adapter_id)

    @router.get("/usage", response_model=UsageView, tags=["tenants"])
    async def usage(tenant: str | None = None, who: Principal = Depends(principal)):
        name = tenant if who.is_admin and tenant else who.tenant
        if name is None:
            raise ServiceError("an admin must name the tenant", "tenant")
        return await run_in_threadpool(plane.usage, name)

    # -- admin --------------------------------------------------------------------------------------

    @router.post("/admin/tenants", response_model=TenantView, status_code=201, tags=["admin"])
    async def create_tenant(body: TenantCreate, _: Principal = Depends(admin)):
        quotas = Quotas(**body.model_dump(exclude={"name"}))
        return await run_in_threadpool(plane.create_tenant, body.name, quotas)

    @router.get("/admin/tenants", response_model=list[TenantView], tags=["admin"])
    async def list_tenants(_: Principal = Depends(admin)):
        return await run_in_threadpool(plane.list_tenants)

    @router.patch("/admin/tenants/{name}", response_model=TenantView, tags=["admin"])
    async def set_quota(name: str, body: Quotas, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.set_quota, name, body)

    @router.put("/admin/tenants/{name}/webhook", response_model=TenantView, tags=["admin"])
    async def set_webhook(name: str, body: WebhookSet, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.set_webhook, name, body.url, body.secret)

    @router.post("/admin/keys", response_model=CreatedKey, status_code=201, tags=["admin"])
    async def create_key(body: KeyCreate, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.create_key, body.scope, body.tenant, body.label)

    @router.get("/admin/keys", response_model=list[KeyView], tags=["admin"])
    async def list_keys(tenant: str | None = None, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.list_keys, tenant)

    @router.delete("/admin/keys/{key_id}", response_model=KeyView, tags=["admin"])
    async def revoke_key(key_id: str, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.revoke_key, key_id)

    app.include_router(router)
    app.state.router = router
    return app


async def _read_submission(request: Request, max_images: int) -> tuple[object, dict[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=max_images + 1, max_fields=16)
        raw_spec = form.get("spec")
        if not isinstance(raw_spec, str):
            raise ServiceError("a multipart submission needs a `spec` field (JSON or YAML)", "spec")
        try:
            spec = yaml.safe_load(raw_spec)
        except yaml.YAMLError as err:
            raise ServiceError(f"not valid JSON or YAML: {err}", "spec") from None
        images: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if key == "spec":
                continue
            if isinstance(value, str) or not getattr(value, "filename", None):
                raise ServiceError("every part but `spec` must be a file", key)
            if value.filename in images:
                raise ServiceError("uploaded twice", f"images.{value.filename}")
            images[value.filename] = await value.read()
        return spec, images
    body = await request.body()
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServiceError(f"malformed JSON: {err}", "body") from None
    try:
        submission = TuningRequest.model_validate(payload)
    except Exception as err:
        problem = err.errors()[0] if hasattr(err, "errors") else {"loc": (), "msg": str(err)}
        raise ServiceError(problem["msg"], ".".join(str(p) for p in problem["loc"]) or "body") from None
    if len(submission.images) > max_images:
        raise ServiceError(f"{len(submission.images)} images; at most {max_images} per job", "images")
    images = {}
    for name, encoded in submission.images.items():
        try:
            images[name] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError("not valid base64", f"images.{name}") from None
    return submission.spec, images


def _wake_scheduler_if_reachable(settings: ControlPlaneSettings) -> Callable[[str], None]:
    def wake(_job_id: str) -> None:
        from cluster.scheduler import find_scheduler

        actor = find_scheduler(settings)
        if actor is not None:
            actor.wake.remote()

    return wake
