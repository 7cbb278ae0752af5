"""The control plane's REST API: `control_plane_router(plane)`, included by the serving ingress and by
`create_app` (standalone: `uvicorn --factory cluster.api:create_app`). OpenAPI at /docs.

Auth is `Authorization: Bearer <key>`. A tenant key sees only its tenant: another tenant's job or adapter
answers 404 exactly like a missing one. Admin routes (`/v1/admin/...`) need an admin key.
Errors are `{"detail": {"field": ..., "message": ..., "code": ...}}` (`cluster.http`; docs/clients.md lists them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Annotated, Literal

import yaml
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from causalt2i.errors import FieldError
from causalt2i.limits import EventId, load_yaml_strictly
from cluster.auth import Principal, bearer_token
from cluster.config import ControlPlaneSettings
from cluster.db import JobState
from cluster.http import (
    ERROR_RESPONSES, BodyLimit, HTTPProblem, SafeJSONRoute, ServerFault, b64, install_error_handlers, multipart_route,
    schema_ref,
)
from cluster.schemas import (
    AdapterView, AdminQueue, Caller, CreatedKey, EventView, JobDeleted, JobView, KeyCreate, KeyView, OwnKeyCreate, Quotas,
    TenantCreate, TenantName, TenantView, TuningRequest, UsageView, WebhookConfigured, WebhookDeliveryView, WebhookSet,
)
from cluster.service import ControlPlane, InvalidInput, ServiceError
from cluster.slots import RequestSlots, Slot, TenantSlots
from cluster.states import TERMINAL
from cluster.store import ArtifactCorrupt

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]


class TuningUpload(BaseModel):
    """`POST /v1/tunings` as multipart/form-data: the spec (JSON or YAML) and the image files it names."""

    model_config = ConfigDict(extra="forbid")
    spec: Annotated[str, Field(description="the spec as JSON or YAML; its image entries are the uploaded file names")]
    files: Annotated[list[bytes], Field(description="the images, each part's filename as the spec names it")]


def too_many_images(count: object, max_images: int) -> HTTPProblem:
    return HTTPProblem(413, "images", f"{count} images; at most {max_images} per job", code="too_many_images")


def _multipart_submission(max_images: int):
    async def convert(request: Request) -> dict:
        try:
            form = await request.form(max_files=max_images, max_fields=16)
        except StarletteHTTPException as err:  # Starlette's multipart limits
            if "Too many files" in str(err.detail):
                raise too_many_images(f"more than {max_images}", max_images) from None
            raise
        raw_spec = form.get("spec")
        if not isinstance(raw_spec, str):
            raise ServiceError("a multipart submission needs a `spec` field (JSON or YAML)", "spec")
        try:
            spec = load_yaml_strictly(raw_spec)
        except yaml.YAMLError as err:
            raise ServiceError(f"not valid JSON or YAML: {err}", "spec") from None
        except FieldError as err:  # a key given twice
            raise HTTPProblem(422, err.within("spec").field, err.message, code="duplicate_key") from None
        images: dict[str, str] = {}
        for key, value in form.multi_items():
            if key == "spec":
                continue
            if isinstance(value, str) or not getattr(value, "filename", None):
                raise ServiceError("every part but `spec` must be a file", key)
            if value.filename in images:
                raise InvalidInput("uploaded twice", f"images.{value.filename}")
            images[value.filename] = b64(await value.read())
        return {"spec": spec, "images": images}

    return convert


class PreviewView(BaseModel):
    """One training preview of a tuning: the images of its prompts at a step (`causalt2i.preview`)."""

    step: int
    prompts: list[str]
    seed: int
    width: int
    height: int
    files: Annotated[list[str], Field(description="download paths, one per prompt, in prompt order")]


PREVIEWS = "previews"
PREVIEW_STEP_FOLDER = "step-{:06d}"


def job_previews(plane: ControlPlane, tenant: str | None, job_id: str) -> list[PreviewView]:
    """The published previews of a job, by step (another tenant's job is a 404, as everywhere)."""
    job = plane.get_job(tenant, job_id)
    found = []
    for folder in plane.store.list(job.tenant, "jobs", job_id, PREVIEWS):
        try:
            record = json.loads(plane.store.read_file(job.tenant, ("jobs", job_id, PREVIEWS, folder), "preview.json"))
        except Exception:  # a damaged preview is left out, never served
            continue
        found.append(PreviewView(
            step=record["step"], prompts=record["prompts"], seed=record["seed"], width=record["width"],
            height=record["height"], files=[f"/v1/tunings/{job_id}/previews/{record['step']}/{name}" for name in record["files"]]))
    return sorted(found, key=lambda p: p.step)


def job_preview_file(plane: ControlPlane, tenant: str | None, job_id: str, step: int, filename: str) -> bytes:
    from cluster.service import NotFound
    from cluster.store import ArtifactCorrupt, ArtifactNotFound

    job = plane.get_job(tenant, job_id)
    try:
        return plane.store.read_file(job.tenant, ("jobs", job_id, PREVIEWS, PREVIEW_STEP_FOLDER.format(step)), filename)
    except ArtifactNotFound:
        raise NotFound(f"tuning {job_id!r} has no preview {filename!r} at step {step}", "filename") from None
    except ArtifactCorrupt as err:
        raise ServiceError(f"stored preview failed its sha256 check: {err}", "filename") from None


class _HeldStream(StreamingResponse):
    """A StreamingResponse that gives its stream slot back however the stream ends (done, error, disconnect,
    Serve cancelling the request): the release runs when the ASGI call returns, not when the generator is
    collected."""

    def __init__(self, *args, slot: Slot, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def control_plane_router(plane: ControlPlane, *, stream_slots: TenantSlots | None = None) -> APIRouter:
    """Every control-plane route, under /v1, bound to `plane`. `stream_slots` caps open event streams per
    tenant and in all (default: from `plane.settings.serve`, per process)."""
    limits = plane.settings.limits
    if stream_slots is None:
        stream_slots = RequestSlots.from_settings(plane.settings.serve).streams
    router = APIRouter(prefix="/v1", route_class=SafeJSONRoute, responses=ERROR_RESPONSES)

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

    upload = APIRouter(route_class=multipart_route(_multipart_submission(limits.max_images_per_job)), responses=ERROR_RESPONSES)

    @upload.post("/tunings", response_model=JobView, status_code=201, tags=["tunings"],
                 openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": schema_ref(TuningUpload)}}}})
    async def submit(body: TuningRequest, who: Principal = Depends(principal)) -> JobView:
        """Submit a tuning: JSON `{spec, images: {name: base64}}`, or multipart with a `spec` field plus image files."""
        if len(body.images) > limits.max_images_per_job:
            raise too_many_images(len(body.images), limits.max_images_per_job)
        images = {}
        for name, encoded in body.images.items():
            try:
                images[name] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("not valid base64", f"images.{name}") from None
        return await run_in_threadpool(plane.submit, scope_of(who), body.spec, images)

    router.include_router(upload)

    @router.get("/tunings", response_model=list[JobView], tags=["tunings"])
    async def list_tunings(state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                           who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.list_jobs, scope_of(who), state=state, limit=limit)

    @router.get("/tunings/{job_id}", response_model=JobView, tags=["tunings"])
    async def get_tuning(job_id: ObjectId, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.get_job, scope_of(who), job_id)

    @router.post("/tunings/{job_id}/cancel", response_model=JobView, tags=["tunings"])
    async def cancel_tuning(job_id: ObjectId, who: Principal = Depends(principal)):
        """Stop a queued or running job (it keeps a checkpoint); its inputs are freed, the job and its history stay.
        409 if it has already ended."""
        return await run_in_threadpool(plane.cancel_job, scope_of(who), job_id)

    @router.delete("/tunings/{job_id}", response_model=JobDeleted, tags=["tunings"])
    async def delete_tuning(job_id: ObjectId, who: Principal = Depends(principal)):
        """Delete a job: cancel it if it is still active, then remove it with its inputs, checkpoints and the adapters
        it registered (no longer listed or served), freeing their stored bytes. GPU time used stays charged."""
        return await run_in_threadpool(plane.delete_job, scope_of(who), job_id)

    @router.get("/tunings/{job_id}/events", tags=["tunings"], response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {"schema": schema_ref(EventView)}},
                                 "description": "server-sent events; each `data:` is an EventView, then `event: end`"}})
    async def tuning_events(job_id: ObjectId, request: Request, who: Principal = Depends(principal),
                            last_event_id: Annotated[EventId | None, Header(description="resume after this event id")] = None):
        """Server-sent events: every state change, checkpoint and progress event, until the job ends."""
        tenant = scope_of(who)
        await run_in_threadpool(plane.get_job, tenant, job_id)  # 404 before the stream starts
        slot = stream_slots.acquire(who.tenant or "admin")  # 429 past the tenant's cap, before the stream starts
        after = last_event_id or 0

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

        return _HeldStream(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, slot=slot)

    @router.get("/tunings/{job_id}/previews", response_model=list[PreviewView], tags=["tunings"])
    async def tuning_previews(job_id: ObjectId, who: Principal = Depends(principal)):
        """The training previews published so far (`train.preview_every`), by step; each file is a PNG download."""
        return await run_in_threadpool(job_previews, plane, scope_of(who), job_id)

    @router.get("/tunings/{job_id}/previews/{step}/{filename}", tags=["tunings"], response_class=Response,
                responses={200: {"content": {"image/png": {}}, "description": "the preview image"}})
    async def tuning_preview_file(job_id: ObjectId, step: Annotated[int, Path(ge=0, le=10**9)],
                                  filename: Annotated[str, Path(pattern=r"^[0-9]{2}\.png$")],
                                  who: Principal = Depends(principal)):
        data = await run_in_threadpool(job_preview_file, plane, scope_of(who), job_id, step, filename)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/adapters", response_model=list[AdapterView], tags=["adapters"])
    async def list_adapters(name: Annotated[str | None, Query(max_length=128)] = None, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.list_adapters, scope_of(who), name=name)

    @router.get("/adapters/{adapter_id}", response_model=AdapterView, tags=["adapters"])
    async def get_adapter(adapter_id: ObjectId, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.get_adapter, scope_of(who), adapter_id)

    @router.get("/adapters/{adapter_id}/files/{filename}", tags=["adapters"], response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}})
    async def download_adapter_file(adapter_id: ObjectId, filename: Annotated[str, Path(max_length=128)],
                                    who: Principal = Depends(principal)):
        """A file of the adapter (adapter.safetensors, manifest.json), sha256-verified before it is sent."""
        try:
            data = await run_in_threadpool(plane.adapter_file, scope_of(who), adapter_id, filename)
        except ArtifactCorrupt as err:  # storage went bad under us: the operators' fault to fix, not the caller's
            raise ServerFault(f"adapter {adapter_id}: {err}", public="the stored adapter failed its integrity check",
                              code="artifact_corrupt") from None
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @router.get("/adapters/{adapter_id}/export", tags=["adapters"], response_class=StreamingResponse,
                responses={200: {"content": {"application/zip": {}}, "description": "the export as a zip archive"}})
    async def export_adapter(adapter_id: ObjectId,
                             format: Annotated[Literal["diffusers", "kohya", "embeddings"], Query(description="diffusers: pytorch_lora_weights.safetensors for load_lora_weights; kohya: ComfyUI / Automatic1111; embeddings: the identifier tokens as textual inversions")],
                             who: Principal = Depends(principal)):
        """The adapter for other tools, with a README naming its tokens and prompts (`ct2i export` over REST)."""
        try:
            filename, data = await run_in_threadpool(plane.adapter_export, scope_of(who), adapter_id, format)
        except ArtifactCorrupt as err:
            raise ServerFault(f"adapter {adapter_id}: {err}", public="the stored adapter failed its integrity check",
                              code="artifact_corrupt") from None
        # Streamed: no Content-Length, the archive goes out piece by piece as zipfile writes it.
        return StreamingResponse(data, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @router.delete("/adapters/{adapter_id}", response_model=AdapterView, tags=["adapters"])
    async def delete_adapter(adapter_id: ObjectId, who: Principal = Depends(principal)):
        return await run_in_threadpool(plane.delete_adapter, scope_of(who), adapter_id)

    @router.get("/usage", response_model=UsageView, tags=["tenants"])
    async def usage(tenant: TenantName | None = None, who: Principal = Depends(principal)):
        name = tenant if who.is_admin and tenant else who.tenant
        if name is None:
            raise ServiceError("an admin must name the tenant", "tenant")
        return await run_in_threadpool(plane.usage, name)

    # -- a tenant's own keys ------------------------------------------------------------------------
    # A tenant key manages its own tenant's keys; another tenant's key id is a 404, like a missing one. Revoking
    # the key making the call is allowed: the next request with it is a 401 (keys are checked on every request).

    async def tenant_key(who: Principal = Depends(principal)) -> Principal:
        if who.tenant is None:
            raise HTTPException(403, {"field": "authorization", "message": "an admin key has no tenant of its own; "
                                      "manage keys with /v1/admin/keys"})
        return who

    @router.get("/me", response_model=Caller, tags=["keys"])
    async def me(who: Principal = Depends(principal)):
        """The presented key's id, scope and tenant: what a client (the web console) shows and acts as."""
        return Caller(key_id=who.key_id, scope=who.scope, tenant=who.tenant)

    @router.get("/keys", response_model=list[KeyView], tags=["keys"])
    async def list_own_keys(who: Principal = Depends(tenant_key)):
        """Your tenant's API keys, oldest first, revoked ones included (`revoked_at`); never their secrets."""
        return await run_in_threadpool(plane.list_keys, who.tenant)

    @router.post("/keys", response_model=CreatedKey, status_code=201, tags=["keys"])
    async def create_own_key(body: OwnKeyCreate, who: Principal = Depends(tenant_key)):
        """A new key for your tenant. Its secret (`key`) is in this answer only: only its hash is stored."""
        return await run_in_threadpool(plane.create_own_key, who.tenant, body.label)

    @router.delete("/keys/{key_id}", response_model=KeyView, tags=["keys"])
    async def revoke_own_key(key_id: ObjectId, who: Principal = Depends(tenant_key)):
        """Revoke one of your tenant's keys, the one making this call included; from now on it answers 401."""
        return await run_in_threadpool(plane.revoke_key, key_id, who.tenant)

    # -- admin --------------------------------------------------------------------------------------

    @router.get("/admin/queue", response_model=AdminQueue, tags=["admin"])
    async def admin_queue(_: Principal = Depends(admin)):
        """Every tenant's queued and active jobs (with the scheduler's waiting reasons) and the GPUs they hold."""
        return await run_in_threadpool(plane.admin_queue)

    @router.post("/admin/tenants", response_model=TenantView, status_code=201, tags=["admin"])
    async def create_tenant(body: TenantCreate, _: Principal = Depends(admin)):
        quotas = Quotas(**body.model_dump(exclude={"name"}))
        return await run_in_threadpool(plane.create_tenant, body.name, quotas)

    @router.get("/admin/tenants", response_model=list[TenantView], tags=["admin"])
    async def list_tenants(_: Principal = Depends(admin)):
        return await run_in_threadpool(plane.list_tenants)

    @router.patch("/admin/tenants/{name}", response_model=TenantView, tags=["admin"])
    async def set_quota(name: Annotated[TenantName, Path()], body: Quotas, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.set_quota, name, body)

    @router.put("/admin/tenants/{name}/webhook", response_model=WebhookConfigured, tags=["admin"])
    async def set_webhook(name: Annotated[TenantName, Path()], body: WebhookSet, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.set_webhook, name, body.url, body.secret)

    @router.get("/admin/tenants/{name}/webhook/deliveries", response_model=list[WebhookDeliveryView], tags=["admin"])
    async def webhook_deliveries(name: Annotated[TenantName, Path()],
                                 outcome: Literal["delivered", "failed", "dead_lettered"] | None = None,
                                 limit: Annotated[int, Query(ge=1, le=1000)] = 100, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.webhook_deliveries, name, outcome, limit)

    @router.post("/admin/tenants/{name}/webhook/redeliver", response_model=TenantView, tags=["admin"])
    async def redeliver_webhooks(name: Annotated[TenantName, Path()],
                                 from_event_id: Annotated[int, Query(ge=1, le=2**63 - 1)], _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.redeliver_webhooks, name, from_event_id)

    @router.post("/admin/keys", response_model=CreatedKey, status_code=201, tags=["admin"])
    async def create_key(body: KeyCreate, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.create_key, body.scope, body.tenant, body.label)

    @router.get("/admin/keys", response_model=list[KeyView], tags=["admin"])
    async def list_keys(tenant: TenantName | None = None, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.list_keys, tenant)

    @router.delete("/admin/keys/{key_id}", response_model=KeyView, tags=["admin"])
    async def revoke_key(key_id: ObjectId, _: Principal = Depends(admin)):
        return await run_in_threadpool(plane.revoke_key, key_id)

    return router


def create_app(settings: ControlPlaneSettings | None = None, *, plane: ControlPlane | None = None,
               notify: Callable[[str], None] | None = None) -> FastAPI:
    """The control-plane API on its own. `notify(job_id)` is called after a submit or cancel (e.g. to wake the
    scheduler actor); default: wake the actor if this process is connected to Ray, else rely on its polling."""
    plane = plane or ControlPlane.open(settings)
    plane.on_change = notify or wake_scheduler_if_reachable(plane.settings)
    app = FastAPI(title="CausalT2I control plane", version="1", description=__doc__)
    app.add_middleware(BodyLimit, default=plane.settings.limits.max_request_bytes)
    install_error_handlers(app)
    app.include_router(control_plane_router(plane))
    app.state.plane = plane
    return app


def wake_scheduler_if_reachable(settings: ControlPlaneSettings) -> Callable[[str], None]:
    def wake(_job_id: str) -> None:
        from cluster.scheduler import find_scheduler

        actor = find_scheduler(settings)
        if actor is not None:
            actor.wake.remote()

    return wake
