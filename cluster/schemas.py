"""The control plane's typed views: what the REST API returns, what `--json` prints, what the CLI tabulates."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from causalt2i.limits import BigInt, Int32, NonNegativeFinite, PositiveFinite, StrictInput
from causalt2i.spec import TuningSpec
from cluster.db import Adapter, ApiKey, Job, JobEvent, JobState, Tenant

TenantName = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]


class View(StrictInput):
    """Input bodies and output views alike: unknown fields refused, floats finite, numbers and booleans strict."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Quotas(View):
    """A tenant's limits. Every field is optional in an update (`set-quota`, `PATCH /v1/admin/tenants/{name}`)."""

    weight: Annotated[PositiveFinite | None, Field(description="fair-share weight")] = None
    max_concurrent_jobs: Int32 | None = None
    max_concurrent_gpus: NonNegativeFinite | None = None
    gpu_hours_per_30d: NonNegativeFinite | None = None
    max_adapters: Int32 | None = None
    max_stored_bytes: BigInt | None = None
    generate_rpm: Annotated[Int32 | None, Field(description="generate requests per minute (enforced by serving)")] = None


class TenantCreate(Quotas):
    name: TenantName


class WebhookSet(View):
    url: Annotated[str | None, Field(max_length=2048, description="https URL; null removes the webhook")] = None
    secret: Annotated[str | None, Field(min_length=16, max_length=128,
                                        description="whsec_ + base64 of 24..64 bytes; omitted: one is generated")] = None


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


class WebhookConfigured(TenantView):
    webhook_secret: Annotated[str | None, Field(description="the signing secret (Standard Webhooks, whsec_…): shown "
                                                            "only in this answer; null when the webhook was removed")]


class WebhookDeliveryView(View):
    """One webhook attempt; `dead_lettered` is an event's last, after `webhooks.max_attempts` failures."""

    event_id: int
    msg_id: Annotated[str, Field(description="the webhook-id header: the same on every attempt of an event")]
    attempt: int
    at: float
    duration_s: float
    outcome: Literal["delivered", "failed", "dead_lettered"]
    status_code: int | None
    error: str | None

    @classmethod
    def of(cls, row) -> "WebhookDeliveryView":
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


class OwnKeyCreate(View):
    """`POST /v1/keys`: a new key for the caller's own tenant (scope `tenant`)."""

    label: Annotated[str, Field(max_length=200, description="what the key is for, e.g. `laptop` or `ci`")] = ""


class QueueEntry(View):
    """One queued or active job as the admin's queue view shows it."""

    id: str
    name: str
    state: JobState
    position: Annotated[int | None, Field(description="1-based place in its tenant's queue (oldest first); null once admitted")]
    queue_reason: Annotated[str | None, Field(description="why the scheduler holds it back, as it last decided")]
    demand_gpus: Annotated[float, Field(description="capacity units admission counts: its GPUs, or one per worker for a CPU job, times the trials a search runs at once")]
    gpus: Annotated[float, Field(description="GPUs its workers hold (0 for a CPU job)")]
    created_at: float
    started_at: float | None


class TenantQueue(View):
    """A tenant's share of the cluster now: its queued and active jobs against its concurrency quotas."""

    tenant: str
    queued_jobs: int
    running_jobs: Annotated[int, Field(description="admitted or running")]
    demand_gpus_in_use: Annotated[float, Field(description="capacity units its active jobs hold")]
    gpus_in_use: Annotated[float, Field(description="GPUs its active jobs' workers hold")]
    max_concurrent_jobs: int
    max_concurrent_gpus: float
    jobs: Annotated[list[QueueEntry], Field(description="active jobs first, then the queue in order")]


class ClusterUsage(View):
    """The cluster as the control plane places work on it: what its active jobs hold, against the capacity it admits
    to. It is the database's view (the placements admission made), so it needs no connection to Ray."""

    capacity_units: Annotated[float | None, Field(description="what admission fills (`CT2I_CAPACITY_GPUS`); null = the "
                                                              "Ray cluster's GPUs (else CPUs), asked by the scheduler")]
    node_gpus: Annotated[float | None, Field(description="GPUs of the configured node types (`CT2I_NODE_TYPES`), if any")]
    demand_gpus_in_use: float
    gpus_in_use: float
    running_jobs: int
    queued_jobs: int


class AdminQueue(View):
    """`GET /v1/admin/queue`: every tenant's queue and the cluster's GPUs in use."""

    cluster: ClusterUsage
    tenants: Annotated[list[TenantQueue], Field(description="every tenant, by name (those with nothing queued included)")]


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
    state: JobState
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
    spec: Annotated[TuningSpec | None, Field(description="as submitted; omitted in listings")] = None

    @classmethod
    def of(cls, row: Job, *, with_spec: bool = True) -> "JobView":
        return cls(
            id=row.id, tenant=row.tenant, name=row.name, state=row.state, attempts=row.attempts, error=row.error,
            queue_reason=row.queue_reason, demand_gpus=row.demand_gpus, adapter_id=row.adapter_id,
            created_at=row.created_at, admitted_at=row.admitted_at, started_at=row.started_at, finished_at=row.finished_at,
            progress=Progress(step=row.progress_step, total_steps=row.progress_total, loss=row.progress_loss,
                              eta_seconds=row.progress_eta_s, terms=json.loads(row.progress_terms_json or "{}"),
                              checkpoint_step=row.checkpoint_step),
            spec=TuningSpec.model_validate_json(row.spec_json) if with_spec else None,
        )


class EventView(View):
    id: int
    job_id: str
    at: float
    kind: Literal["state", "log", "progress"]
    state: JobState | None
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
    uri: Annotated[str, Field(exclude=True, description="where the artifact is stored: for the platform's own use, "
                                                         "never serialized into a response or `--json`")] = ""
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
    """What counts against a tenant's quotas (`cluster.quotas`)."""

    tenant: str
    gpu_seconds_30d: Annotated[float, Field(description="GPU-seconds used in the last 30 days, running jobs included")]
    gpu_hours_budget_30d: float
    gpu_seconds_remaining_30d: Annotated[float | None, Field(description="what the budget has left; null = unlimited")] = None
    running_jobs: int
    queued_jobs: int
    adapters: int
    stored_bytes: Annotated[int, Field(description="stored_input_bytes + stored_adapter_bytes")]
    stored_input_bytes: Annotated[int, Field(description="inputs of jobs not cancelled or deleted")] = 0
    stored_adapter_bytes: Annotated[int, Field(description="files of ready adapters")] = 0
    max_stored_bytes: int | None = None
    max_concurrent_jobs: Annotated[int | None, Field(description="the tenant's quotas beside what uses them")] = None
    max_concurrent_gpus: float | None = None
    max_adapters: int | None = None
    generate_rpm: int | None = None


class Caller(View):
    """`GET /v1/me`: who the presented key is (never its secret)."""

    key_id: str
    scope: Literal["tenant", "admin"]
    tenant: Annotated[str | None, Field(description="null for an admin key")]


class JobDeleted(View):
    """`DELETE /v1/tunings/{id}`: what was removed and freed."""

    id: str
    tenant: str
    state: Annotated[JobState, Field(description="the job's state when it was deleted (an active job was cancelled first)")]
    freed_input_bytes: int
    freed_adapter_bytes: int
    deleted_adapters: Annotated[list[str], Field(description="ids of the adapters the job had registered, now deleted")]


class TuningRequest(View):
    """`POST /v1/tunings` as JSON: the spec (its image entries are names) and the images, base64-encoded, by name."""

    spec: TuningSpec
    images: Annotated[dict[str, str], Field(description="image name → base64 bytes; every name the spec uses")] = {}
