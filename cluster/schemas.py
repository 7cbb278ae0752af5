"""The control plane's typed views: what the REST API returns, what `--json` prints, what the CLI tabulates."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.db import Adapter, ApiKey, Job, JobEvent, Tenant

TenantName = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quotas(View):
    """A tenant's limits. Every field is optional in an update (`set-quota`, `PATCH /v1/admin/tenants/{name}`)."""

    weight: Annotated[float | None, Field(gt=0, description="fair-share weight")] = None
    max_concurrent_jobs: Annotated[int | None, Field(ge=0)] = None
    max_concurrent_gpus: Annotated[float | None, Field(ge=0)] = None
    gpu_hours_per_30d: Annotated[float | None, Field(ge=0)] = None
    max_adapters: Annotated[int | None, Field(ge=0)] = None
    max_stored_bytes: Annotated[int | None, Field(ge=0)] = None
    generate_rpm: Annotated[int | None, Field(ge=0, description="generate requests per minute (enforced by serving)")] = None


class TenantCreate(Quotas):
    name: TenantName


class WebhookSet(View):
    url: Annotated[str | None, Field(max_length=2048, description="https URL; null removes the webhook")] = None
    secret: Annotated[str | None, Field(min_length=16, max_length=128)] = None


class TenantView(View):
    name: str
    weight: float
    max_concurrent_jobs: int
    max_concurrent_gpus: float
    gpu_hours_per_30d: float
    max_adapters: int
    max_stored_bytes: int
    generate_rpm: int
    webhook_url: str | None
    created_at: float

    @classmethod
    def of(cls, row: Tenant) -> "TenantView":
        return cls(**{name: getattr(row, name) for name in cls.model_fields})


class KeyCreate(View):
    scope: Literal["tenant", "admin"] = "tenant"
    tenant: TenantName | None = None
    label: Annotated[str, Field(max_length=200)] = ""


class KeyView(View):
    id: str
    scope: str
    tenant: str | None
    label: str
    created_at: float
    revoked_at: float | None

    @classmethod
    def of(cls, row: ApiKey) -> "KeyView":
        return cls(**{name: getattr(row, name) for name in cls.model_fields})


class CreatedKey(KeyView):
    key: Annotated[str, Field(description="the secret; shown once, only its hash is stored")]


class Progress(View):
    step: int
    total_steps: int
    loss: float | None
    eta_seconds: float | None
    terms: dict[str, float]
    checkpoint_step: int | None


class JobView(View):
    id: str
    tenant: str
    name: str
    state: str
    attempts: int
    error: str | None
    queue_reason: str | None
    demand_gpus: float
    progress: Progress
    adapter_id: str | None
    created_at: float
    admitted_at: float | None
    started_at: float | None
    finished_at: float | None
    spec: dict

    @classmethod
    def of(cls, row: Job, *, with_spec: bool = True) -> "JobView":
        return cls(
            id=row.id, tenant=row.tenant, name=row.name, state=row.state, attempts=row.attempts, error=row.error,
            queue_reason=row.queue_reason, demand_gpus=row.demand_gpus, adapter_id=row.adapter_id,
            created_at=row.created_at, admitted_at=row.admitted_at, started_at=row.started_at, finished_at=row.finished_at,
            progress=Progress(step=row.progress_step, total_steps=row.progress_total, loss=row.progress_loss,
                              eta_seconds=row.progress_eta_s, terms=json.loads(row.progress_terms_json or "{}"),
                              checkpoint_step=row.checkpoint_step),
            spec=json.loads(row.spec_json) if with_spec else {},
        )


class EventView(View):
    id: int
    job_id: str
    at: float
    kind: str
    state: str | None
    message: str
    data: dict

    @classmethod
    def of(cls, row: JobEvent) -> "EventView":
        return cls(id=row.id, job_id=row.job_id, at=row.at, kind=row.kind, state=row.state, message=row.message,
                   data=json.loads(row.data_json or "{}"))


class AdapterView(View):
    id: str
    tenant: str
    name: str
    version: int
    uri: str
    sha256: str
    bytes: int
    base_model: str
    base_fingerprint: str
    param_mode: str
    metrics: dict
    status: str
    job_id: str | None
    created_at: float

    @classmethod
    def of(cls, row: Adapter) -> "AdapterView":
        values = {name: getattr(row, name) for name in cls.model_fields if name != "metrics"}
        return cls(metrics=json.loads(row.metrics_json or "{}"), **values)


class UsageView(View):
    tenant: str
    gpu_seconds_30d: float
    gpu_hours_budget_30d: float
    running_jobs: int
    queued_jobs: int
    adapters: int
    stored_bytes: int


class TuningRequest(View):
    """`POST /v1/tunings` as JSON: the spec (image entries are names) and the images, base64-encoded, by name."""

    spec: dict
    images: dict[str, str] = {}
