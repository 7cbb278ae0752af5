"""The control plane's operations. The REST API and the CLI both call these and nothing else.

Scoping: every read or write of a job or adapter takes the caller's tenant (None for an admin) and filters
on it in SQL, so another tenant's object is indistinguishable from a missing one (`NotFound`, 404).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
import shutil
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from causalt2i.errors import FieldError, field_error
from causalt2i.limits import MAX_TRAIN_STEPS
from causalt2i.spec import TuningSpec
from cluster import auth
from cluster.config import ControlPlaneSettings
from cluster.db import Adapter, ApiKey, Database, Job, JobEvent, JobState, Tenant, UsageRecord, WebhookDelivery, database_for
from cluster.schemas import (
    AdapterView, AdminQueue, ClusterUsage, CreatedKey, EventView, JobDeleted, JobView, KeyView, QueueEntry, Quotas,
    TenantQueue, TenantView, UsageView, WebhookConfigured, WebhookDeliveryView,
)
from cluster.quotas import (
    THIRTY_DAYS_S, budget_gpu_seconds, budget_spent_message, lock_tenant, stored_adapter_bytes, stored_input_bytes,
    used_gpu_seconds,
)
from cluster.states import ACTIVE, TERMINAL, add_event, end_attempt, transition
from cluster.store import ArtifactNotFound, ArtifactStore, StorePathError, safe_part

INPUTS = "inputs"
MAX_LIVE_KEYS_PER_TENANT = 50
"""A tenant may hold this many unrevoked keys: enough for every laptop and pipeline, few enough that a leaked
key making keys cannot flood the table."""


class ServiceError(FieldError):
    """Bad input or a refused operation, as the API answers it: `status` is the HTTP status."""

    status = 400

    def __init__(self, message: str, field: str = ""):
        super().__init__(field, message)


class InvalidInput(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class QuotaExceeded(ServiceError):
    status = 429


class Forbidden(ServiceError):
    status = 403


def concurrent_runs(spec: TuningSpec) -> int:
    """How many Train runs of the job hold resources at once: a search's trials run `max_concurrent` at a time
    (never more than there are), anything else is one run."""
    return min(spec.search.max_concurrent, spec.search.num_samples) if spec.search is not None else 1


def job_demand_gpus(spec: TuningSpec) -> float:
    """Capacity units a job holds: its GPUs, or one unit per worker for a CPU-only job, for each run it holds at
    once. A search admitted as one trial's worth would run `max_concurrent` trials on it: the trials beyond the
    first wait for workers the fleet never had free, and fail at the worker-start timeout."""
    per_run = spec.resources.total_gpus or float(spec.resources.num_workers)
    return per_run * concurrent_runs(spec)


def validate_image(data: bytes, name: str) -> None:
    from causalt2i.data.images import ImageInputError, validate_image_bytes

    try:
        validate_image_bytes(data, name=name)
    except ImageInputError as err:
        raise InvalidInput(err.reason, f"images.{name}") from None


@dataclass
class ControlPlane:
    settings: ControlPlaneSettings
    db: Database
    store: ArtifactStore
    clock: Callable[[], float] = time.time
    # Called with a job id after a change the scheduler should act on (submit, cancel). Best effort.
    on_change: Callable[[str], None] | None = None

    @classmethod
    def open(cls, settings: ControlPlaneSettings | None = None, **kwargs) -> "ControlPlane":
        settings = settings or ControlPlaneSettings.from_env()
        return cls(settings=settings, db=database_for(settings.database_url), store=ArtifactStore(settings.artifacts_uri), **kwargs)

    def _notify(self, job_id: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(job_id)
            except Exception:  # the scheduler also polls; a lost wake-up only delays
                pass

    # -- tenants -------------------------------------------------------------------------------------

    def create_tenant(self, name: str, quotas: Quotas | None = None) -> TenantView:
        safe_part(name, "name")
        values = {k: v for k, v in (quotas or Quotas()).model_dump().items() if v is not None}
        try:
            with self.db.write() as session:
                session.execute(insert(Tenant).values(name=name, created_at=self.clock(), **values))
        except IntegrityError:
            raise Conflict(f"tenant {name!r} exists", "name") from None
        return self.get_tenant(name)

    def get_tenant(self, name: str) -> TenantView:
        with self.db.read() as session:
            row = session.get(Tenant, name)
            if row is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            return TenantView.of(row)

    def list_tenants(self) -> list[TenantView]:
        with self.db.read() as session:
            return [TenantView.of(r) for r in session.execute(select(Tenant).order_by(Tenant.name)).scalars()]

    def set_quota(self, name: str, quotas: Quotas) -> TenantView:
        values = {k: v for k, v in quotas.model_dump().items() if v is not None}
        if not values:
            raise InvalidInput("nothing to change", "quotas")
        with self.db.write() as session:
            if session.execute(update(Tenant).where(Tenant.name == name).values(**values)).rowcount != 1:
                raise NotFound(f"no tenant {name!r}", "tenant")
        return self.get_tenant(name)

    def set_webhook(self, name: str, url: str | None, secret: str | None = None) -> WebhookConfigured:
        """Set (or with url None remove) a tenant's webhook. The signing secret is in this answer only: given, or a
        new `whsec_` one. Setting a URL starts its queue after the newest event (no flood of history)."""
        from cluster.webhooks import WebhookRefused, check_webhook_url, new_secret, secret_key

        if url is not None:
            try:
                check_webhook_url(url, self.settings.webhook_allow_hosts, self.settings.webhook_allow_networks)
            except WebhookRefused as err:
                raise InvalidInput(str(err), "url") from None
        if secret is not None:
            try:
                secret_key(secret)
            except ValueError as err:
                raise InvalidInput(f"not a Standard Webhooks secret: {err}", "secret") from None
        with self.db.write() as session:
            tenant = session.get(Tenant, name)
            if tenant is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            cursor = session.execute(select(func.coalesce(func.max(JobEvent.id), 0)).where(JobEvent.tenant == name)).scalar_one()
            tenant.webhook_url = url
            tenant.webhook_secret = (secret or new_secret()) if url else None
            tenant.webhook_cursor, tenant.webhook_attempts, tenant.webhook_next_at = cursor, 0, 0.0
            tenant.webhook_last_error = None
            shown = tenant.webhook_secret
        return WebhookConfigured(**self.get_tenant(name).model_dump(), webhook_secret=shown)

    def webhook_secret(self, name: str) -> str | None:
        with self.db.read() as session:
            row = session.get(Tenant, name)
            if row is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            return row.webhook_secret

    def redeliver_webhooks(self, name: str, from_event_id: int) -> TenantView:
        """Rewind the tenant's queue to `from_event_id` (a dead letter's `event_id`): it and every later state event
        are sent again, with their original `webhook-id`s, so receivers can drop what they already have."""
        with self.db.write() as session:
            tenant = session.get(Tenant, name)
            if tenant is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            if not tenant.webhook_url:
                raise InvalidInput("the tenant has no webhook", "tenant")
            event = session.get(JobEvent, from_event_id)
            if event is None or event.tenant != name or event.kind != "state":
                raise NotFound(f"no state event {from_event_id} of tenant {name!r}", "event_id")
            tenant.webhook_cursor, tenant.webhook_attempts, tenant.webhook_next_at = from_event_id - 1, 0, 0.0
        return self.get_tenant(name)

    def webhook_deliveries(self, name: str, outcome: str | None = None, limit: int = 100) -> list[WebhookDeliveryView]:
        """The tenant's latest webhook attempts, newest first (`outcome='dead_lettered'`: its dead letters)."""
        with self.db.read() as session:
            if session.get(Tenant, name) is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            query = select(WebhookDelivery).where(WebhookDelivery.tenant == name)
            if outcome is not None:
                query = query.where(WebhookDelivery.outcome == outcome)
            rows = session.execute(query.order_by(WebhookDelivery.id.desc()).limit(limit)).scalars().all()
            return [WebhookDeliveryView.of(row) for row in rows]

    # -- keys ----------------------------------------------------------------------------------------

    def create_key(self, scope: str = "tenant", tenant: str | None = None, label: str = "") -> CreatedKey:
        if scope not in ("tenant", "admin"):
            raise InvalidInput("must be 'tenant' or 'admin'", "scope")
        if scope == "tenant" and not tenant:
            raise InvalidInput("a tenant key needs a tenant", "tenant")
        if scope == "admin":
            tenant = None
        secret = auth.new_secret()
        key_id = auth.new_key_id()
        with self.db.write() as session:
            if tenant is not None and session.get(Tenant, tenant) is None:
                raise NotFound(f"no tenant {tenant!r}", "tenant")
            session.execute(insert(ApiKey).values(id=key_id, key_hash=auth.hash_key(secret, self.settings.key_pepper),
                                                  scope=scope, tenant=tenant, label=label, created_at=self.clock()))
            row = session.get(ApiKey, key_id)
            return CreatedKey(key=secret, **KeyView.of(row).model_dump())

    def create_own_key(self, tenant: str, label: str = "") -> CreatedKey:
        """A tenant key made by the tenant itself (`POST /v1/keys`), within `MAX_LIVE_KEYS_PER_TENANT` live keys."""
        with self.db.read() as session:
            live = session.execute(select(func.count()).select_from(ApiKey)
                                   .where(ApiKey.tenant == tenant, ApiKey.revoked_at.is_(None))).scalar_one()
        if live >= MAX_LIVE_KEYS_PER_TENANT:
            raise Conflict(f"{live} live keys; at most {MAX_LIVE_KEYS_PER_TENANT} per tenant: revoke one first", "keys")
        return self.create_key("tenant", tenant, label)

    def revoke_key(self, key_id: str, tenant: str | None = None) -> KeyView:
        with self.db.write() as session:
            row = session.get(ApiKey, key_id)
            if row is None or (tenant is not None and row.tenant != tenant):
                raise NotFound(f"no key {key_id!r}", "key_id")
            auth.revoke(session, key_id, self.clock())
            session.refresh(row)
            return KeyView.of(row)

    def list_keys(self, tenant: str | None = None) -> list[KeyView]:
        with self.db.read() as session:
            query = select(ApiKey).order_by(ApiKey.created_at)
            if tenant is not None:
                query = query.where(ApiKey.tenant == tenant)
            return [KeyView.of(r) for r in session.execute(query).scalars()]

    def authenticate(self, secret: str | None) -> auth.Principal | None:
        with self.db.read() as session:
            return auth.authenticate(session, secret, self.settings.key_pepper)

    # -- jobs ----------------------------------------------------------------------------------------

    def parse_spec(self, data: object) -> TuningSpec:
        """A submitted spec mapping (JSON or YAML as sent) as a TuningSpec; errors name `spec.<field>`."""
        if isinstance(data, TuningSpec):
            return data
        if not isinstance(data, dict):
            raise InvalidInput("must be a mapping of spec fields", "spec")
        try:
            return TuningSpec.model_validate(data)
        except ValidationError as err:
            found = field_error(err, prefix="spec")
            raise InvalidInput(found.message, found.field) from None

    def check_runnable(self, spec: TuningSpec) -> None:
        """What the platform refuses although the spec itself is valid: a base it does not offer (tenants name
        bases, never server paths), more steps than it runs, workers no node can hold, a memory plan larger than
        its share of a GPU (`CT2I_GPU_MEMORY_GB`)."""
        from cluster.placement import cluster_shape, unplaceable_reason

        offered = self.settings.base_models
        if spec.base_model not in offered:
            raise InvalidInput(f"{spec.base_model!r} is not offered here; choose one of: {', '.join(sorted(offered))}",
                               "spec.base_model")
        if spec.image_encoder is not None and spec.image_encoder not in self.settings.image_encoders:
            choices = ", ".join(sorted(self.settings.image_encoders)) or "none (leave it null: the base's default)"
            raise InvalidInput(f"{spec.image_encoder!r} is not offered here; choose one of: {choices}", "spec.image_encoder")
        if spec.total_steps > MAX_TRAIN_STEPS:
            raise InvalidInput(f"{spec.total_steps} steps; at most {MAX_TRAIN_STEPS} per job", "spec.train.steps")
        reason = unplaceable_reason(spec.resources, cluster_shape(self.settings))
        if reason is not None:
            raise InvalidInput(reason, "spec.resources")
        if spec.resources.gpus_per_worker > 0:  # a GPU job: its memory plan must fit its share of a GPU
            from causalt2i.plan import PlanError, check_plan_fits

            # The plan is of the base the job will train: the offered name's hub id or folder.
            source = spec.model_copy(update={"base_model": offered[spec.base_model]})
            try:
                check_plan_fits(source, self.settings.gpu_memory_gb)
            except PlanError as err:
                raise InvalidInput(err.message, f"spec.{err.field}") from None

    def submit(self, tenant: str | None, spec: TuningSpec | dict, images: dict[str, bytes]) -> JobView:
        """Validate, store the images with the job, and queue it. `tenant` None = admin (spec.tenant is used).

        Nothing is stored unless everything is valid; image names in the spec refer to keys of `images`.
        """
        limits = self.settings.limits
        if not isinstance(images, dict):
            raise InvalidInput("must map image names to bytes", "images")
        if len(images) > limits.max_images_per_job:
            raise InvalidInput(f"{len(images)} images; at most {limits.max_images_per_job} per job", "images")
        for name, data in images.items():
            try:
                safe_part(name, f"images.{name}")
            except StorePathError as err:
                raise InvalidInput(err.message, err.field) from None
            if PurePosixPath(name).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
                raise InvalidInput("not a JPEG, PNG or WebP file name", f"images.{name}")
            if len(data) > limits.max_image_bytes:
                raise InvalidInput(f"{len(data)} bytes; at most {limits.max_image_bytes} per image", f"images.{name}")
        spec = self.parse_spec(spec)
        if tenant is not None and spec.tenant != tenant:
            raise InvalidInput(f"must be your own tenant {tenant!r}", "spec.tenant")
        referenced: set[str] = set()
        for i, subject in enumerate(spec.subjects):
            for j, name in enumerate(subject.images):
                field = f"spec.subjects.{i}.images.{j}"
                try:
                    safe_part(name, field)
                except StorePathError as err:
                    raise InvalidInput(err.message, field) from None
                if name not in images:
                    raise InvalidInput(f"{name!r} was not uploaded", field)
                referenced.add(name)
        unreferenced = sorted(set(images) - referenced)
        if unreferenced:
            raise InvalidInput(f"uploaded but not used by the spec: {', '.join(unreferenced)}", "images")
        for name in sorted(referenced):
            validate_image(images[name], name)
        self.check_runnable(spec)

        demand = job_demand_gpus(spec)
        input_bytes = sum(len(images[n]) for n in referenced)
        with self.db.read() as session:  # refuse what is plainly over quota before storing anything
            self._check_submit_quotas(session, spec, demand, input_bytes, self.clock())

        job_id = "job-" + secrets.token_hex(6)
        self.store.publish_files(spec.tenant, ("jobs", job_id, INPUTS), {n: images[n] for n in referenced})
        try:
            with self.db.write() as session:
                # The check that counts: under the tenant's row lock, in the transaction that inserts the job, so
                # concurrent submits of one tenant see each other's bytes (N submits with room for one: one job).
                now = self.clock()
                if lock_tenant(session, spec.tenant) is None:
                    raise NotFound(f"no tenant {spec.tenant!r}", "tenant")
                self._check_submit_quotas(session, spec, demand, input_bytes, now)
                session.execute(insert(Job).values(
                    id=job_id, tenant=spec.tenant, name=spec.name, spec_json=json.dumps(spec.model_dump(mode="json")),
                    state=JobState.queued, attempts=0, max_attempts=self.settings.scheduler.max_attempts, demand_gpus=demand, input_bytes=input_bytes,
                    created_at=now, updated_at=now, progress_total=spec.progress_total))
                add_event(session, job_id=job_id, tenant=spec.tenant, at=now, kind="state", state=JobState.queued,
                          message="submitted", data={"attempt": 0})
        except BaseException:
            self.store.delete(spec.tenant, "jobs", job_id)  # the new job's folder, inputs and all
            raise
        self._notify(job_id)
        return self.get_job(tenant, job_id)

    def _check_submit_quotas(self, session, spec: TuningSpec, demand: float, input_bytes: int, now: float) -> None:
        """Refuse a submit its tenant's quotas cannot hold: GPUs, GPU-hours, stored bytes, adapters.

        GPU-hours: a budget already spent (or 0) is refused, and so is a job whose steps cannot fit what remains even
        at `limits.min_gpu_seconds_per_step` per GPU (a floor, so only a job that surely cannot finish is refused; the
        budget is enforced while it runs). Every other running or queued job of the tenant shares what remains."""
        row = session.get(Tenant, spec.tenant)
        if row is None:
            raise NotFound(f"no tenant {spec.tenant!r}", "tenant")
        if demand > row.max_concurrent_gpus:
            runs = concurrent_runs(spec)
            if runs > 1:
                raise InvalidInput(f"needs {demand:g} GPUs ({runs} trials at once × {demand / runs:g}); the tenant's "
                                   f"max_concurrent_gpus is {row.max_concurrent_gpus:g}: lower search.max_concurrent",
                                   "spec.search.max_concurrent")
            raise InvalidInput(f"needs {demand:g} GPUs; the tenant's max_concurrent_gpus is {row.max_concurrent_gpus:g}",
                               "spec.resources")
        budget = budget_gpu_seconds(row.gpu_hours_per_30d)
        used = used_gpu_seconds(session, spec.tenant, now)
        if used >= budget:
            raise QuotaExceeded(budget_spent_message(used, row.gpu_hours_per_30d) + "; no job can run until it is raised "
                                "or usage ages out of the window", "tenant.gpu_hours_per_30d")
        floor = spec.total_steps * demand * self.settings.limits.min_gpu_seconds_per_step
        if floor > budget - used:
            fits = int((budget - used) / (demand * self.settings.limits.min_gpu_seconds_per_step))
            raise QuotaExceeded(f"{spec.total_steps} steps on {demand:g} GPUs need at least {floor:.0f} GPU-seconds "
                                f"({self.settings.limits.min_gpu_seconds_per_step:g} s per step per GPU); the tenant's GPU-hour "
                                f"budget has {budget - used:.0f} left: at most {fits} steps fit", "spec.train.steps")
        stored = self._stored_bytes(session, spec.tenant)
        if stored + input_bytes > row.max_stored_bytes:
            raise QuotaExceeded(f"storing {input_bytes} more bytes would exceed max_stored_bytes={row.max_stored_bytes} "
                                f"({stored} used; deleting jobs or adapters frees their bytes)", "tenant.max_stored_bytes")
        adapters = session.execute(select(func.count()).select_from(Adapter)
                                   .where(Adapter.tenant == spec.tenant, Adapter.status == "ready")).scalar_one()
        if adapters >= row.max_adapters:
            raise QuotaExceeded(f"{adapters} adapters of max_adapters={row.max_adapters}; delete one first",
                                "tenant.max_adapters")

    @staticmethod
    def _stored_bytes(session, tenant: str) -> int:
        return stored_input_bytes(session, tenant) + stored_adapter_bytes(session, tenant)

    def _job_row(self, session, tenant: str | None, job_id: str) -> Job:
        query = select(Job).where(Job.id == job_id)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no tuning job {job_id!r}", "id")
        return row

    def get_job(self, tenant: str | None, job_id: str) -> JobView:
        with self.db.read() as session:
            return JobView.of(self._job_row(session, tenant, job_id))

    def list_jobs(self, tenant: str | None, *, state: JobState | None = None, limit: int = 100) -> list[JobView]:
        with self.db.read() as session:
            query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(max(1, min(limit, 1000)))
            if tenant is not None:
                query = query.where(Job.tenant == tenant)
            if state is not None:
                query = query.where(Job.state == state)
            return [JobView.of(r, with_spec=False) for r in session.execute(query).scalars()]

    def cancel_job(self, tenant: str | None, job_id: str) -> JobView:
        now = self.clock()
        with self.db.write() as session:
            job = self._job_row(session, tenant, job_id)
            if job.state in TERMINAL:
                raise Conflict(f"job already {job.state}", "state")
            if job.state == JobState.queued:
                ok = transition(session, job_id, expected=JobState.queued, to=JobState.cancelled, now=now,
                                message="cancelled by request")
            else:
                ok = end_attempt(session, job, to=JobState.cancelled, now=now, half_life_s=self.settings.scheduler.fair_share_half_life_s,
                                 message="cancelled by request")
            if not ok:
                raise Conflict("job changed state meanwhile; retry", "state")
            owner = job.tenant
        # A cancelled job's inputs stop counting with the state change (`cluster.quotas`); their files go now.
        self._remove_inputs(owner, job_id)
        self._notify(job_id)
        return self.get_job(tenant, job_id)

    def _remove_inputs(self, tenant: str, job_id: str) -> None:
        self.store.delete(tenant, "jobs", job_id, INPUTS)
        if self.store.is_local:  # the run's sha256-checked copy of them (cluster.runner)
            shutil.rmtree(Path(self.store.path(tenant, "jobs", job_id)) / "inputs-verified", ignore_errors=True)

    def delete_job(self, tenant: str | None, job_id: str) -> JobDeleted:
        """Delete a job: cancel it if it is still queued or running, then remove its row, its inputs, its run folder
        (checkpoints) and the adapters it registered (no longer listed or served). Their bytes stop counting in the
        same transaction. The GPU time it used stays charged: the usage ledger is history, not storage."""
        now = self.clock()
        with self.db.write() as session:
            # Row-locked, so a run ending at this moment either finished first (its adapter is deleted with the job)
            # or finds the row gone and removes what it published.
            session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            job = self._job_row(session, tenant, job_id)
            owner, state = job.tenant, JobState(job.state)
            if state == JobState.queued:
                transition(session, job_id, expected=JobState.queued, to=JobState.cancelled, now=now,
                           message="cancelled: the job was deleted")
            elif state in ACTIVE:
                end_attempt(session, job, to=JobState.cancelled, now=now, half_life_s=self.settings.scheduler.fair_share_half_life_s,
                            message="cancelled: the job was deleted")
            adapters = session.execute(select(Adapter).where(Adapter.job_id == job_id, Adapter.tenant == owner,
                                                             Adapter.status == "ready")).scalars().all()
            session.execute(update(Adapter).where(Adapter.job_id == job_id, Adapter.tenant == owner, Adapter.status == "ready")
                            .values(status="deleted", deleted_at=now))
            deleted = session.execute(delete(Job).where(Job.id == job_id, Job.tenant == owner)).rowcount
            if deleted != 1:
                raise Conflict("job changed meanwhile; retry", "id")
            freed_inputs = job.input_bytes if state != JobState.cancelled else 0
            final = JobState.cancelled if state == JobState.queued or state in ACTIVE else state
            result = JobDeleted(id=job_id, tenant=owner, state=final, freed_input_bytes=freed_inputs,
                                freed_adapter_bytes=sum(a.bytes for a in adapters), deleted_adapters=[a.id for a in adapters])
            uris = [a.uri for a in adapters]
        for uri in uris:
            try:
                self.store.delete(owner, *self.store.parse_uri(uri, owner))
            except StorePathError:
                pass
        self.store.delete(owner, "jobs", job_id, INPUTS)
        self.store.delete(owner, "jobs", job_id)
        shutil.rmtree(self.settings.work_dir / owner / job_id, ignore_errors=True)  # a remote store's scratch run folder
        self._notify(job_id)
        return result

    def job_events(self, tenant: str | None, job_id: str, *, after: int = 0, limit: int = 500) -> list[EventView]:
        with self.db.read() as session:
            self._job_row(session, tenant, job_id)
            rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                   .order_by(JobEvent.id).limit(limit)).scalars()
            return [EventView.of(r) for r in rows]

    # -- adapters ------------------------------------------------------------------------------------

    def _adapter_row(self, session, tenant: str | None, adapter_id: str) -> Adapter:
        query = select(Adapter).where(Adapter.id == adapter_id, Adapter.status == "ready")
        if tenant is not None:
            query = query.where(Adapter.tenant == tenant)
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no adapter {adapter_id!r}", "id")
        return row

    def list_adapters(self, tenant: str | None, *, name: str | None = None) -> list[AdapterView]:
        with self.db.read() as session:
            query = select(Adapter).where(Adapter.status == "ready").order_by(Adapter.tenant, Adapter.name, Adapter.version)
            if tenant is not None:
                query = query.where(Adapter.tenant == tenant)
            if name is not None:
                query = query.where(Adapter.name == name)
            return [AdapterView.of(r) for r in session.execute(query).scalars()]

    def get_adapter(self, tenant: str | None, adapter_id: str) -> AdapterView:
        with self.db.read() as session:
            return AdapterView.of(self._adapter_row(session, tenant, adapter_id))

    def adapter_file(self, tenant: str | None, adapter_id: str, filename: str) -> bytes:
        """One file of an adapter, sha256-verified (download; what serving loads). `ArtifactCorrupt` (a server-side
        fault, its message naming the storage path) passes through for the caller to log, not to show."""
        view = self.get_adapter(tenant, adapter_id)
        try:
            safe_part(filename, "filename")
            parts = self.store.parse_uri(view.uri, view.tenant)
            return self.store.read_file(view.tenant, parts, filename)
        except StorePathError as err:
            raise InvalidInput(err.message, err.field) from None
        except ArtifactNotFound:
            raise NotFound(f"adapter {adapter_id!r} has no file {filename!r}", "filename") from None

    def adapter_export(self, tenant: str | None, adapter_id: str, fmt: str) -> tuple[str, Iterator[bytes]]:
        """The adapter exported for other tools (`causalt2i.export`: diffusers, kohya, embeddings) as a zip:
        (file name, the archive's pieces). Everything that can refuse runs here, before the first piece: the files
        are fetched sha256-verified into scratch (the same check the download route and serving make), and an
        export the adapter cannot have (a full tune without a LoRA form as a LoRA file) is an `InvalidInput`
        naming the field. The pieces are produced as they are consumed (`zip_chunks`), so a download never holds
        the whole archive."""
        import tempfile

        from causalt2i.adapter import AdapterError, load_adapter
        from causalt2i.export import ExportError, check_format, export_files, zip_chunks

        view = self.get_adapter(tenant, adapter_id)
        try:
            check_format(fmt)
        except ExportError as err:
            raise InvalidInput(err.message, err.field) from None
        parts = self.store.parse_uri(view.uri, view.tenant)
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="export-", dir=self.settings.work_dir) as scratch:
            folder = Path(scratch) / "adapter"
            self.store.fetch_dir(view.tenant, parts, folder)  # ArtifactCorrupt passes through: a server-side fault
            try:
                export = export_files(load_adapter(folder), fmt)
            except ExportError as err:
                raise InvalidInput(err.message, err.field) from None
            except AdapterError as err:
                raise ServiceError(f"adapter {adapter_id} cannot be read: {err}", "adapter") from None
        return f"{view.name}-v{view.version}-{fmt}.zip", zip_chunks(export)

    def resolve_adapter_for_use(self, tenant: str, adapter_id: str) -> AdapterView:
        """What serving calls before routing a generate request: the tenant's own ready adapter, or NotFound."""
        return self.get_adapter(tenant, adapter_id)

    def delete_adapter(self, tenant: str | None, adapter_id: str) -> AdapterView:
        now = self.clock()
        with self.db.write() as session:
            row = self._adapter_row(session, tenant, adapter_id)
            session.execute(update(Adapter).where(Adapter.id == adapter_id, Adapter.status == "ready")
                            .values(status="deleted", deleted_at=now))
            view = AdapterView.of(row)
        try:
            self.store.delete(view.tenant, *self.store.parse_uri(view.uri, view.tenant))
        except StorePathError:
            pass
        return view.model_copy(update={"status": "deleted"})

    # -- usage ---------------------------------------------------------------------------------------

    def admin_queue(self) -> AdminQueue:
        """Every tenant's queued and active jobs and the GPUs they hold, from the jobs table: the placements admission
        made are rows in states `admitted`/`running`, each with its demand, so no Ray connection is needed."""
        with self.db.read() as session:
            tenants = session.execute(select(Tenant).order_by(Tenant.name)).scalars().all()
            rows = session.execute(select(Job.id, Job.tenant, Job.name, Job.state, Job.queue_reason, Job.demand_gpus,
                                          Job.spec_json, Job.created_at, Job.started_at)
                                   .where(Job.state.in_([JobState.queued, *ACTIVE])).order_by(Job.created_at, Job.id)).all()
        by_tenant: dict[str, list[QueueEntry]] = {t.name: [] for t in tenants}
        for row in rows:
            queue = by_tenant.setdefault(row.tenant, [])
            queued = row.state == JobState.queued
            spec = TuningSpec.model_validate_json(row.spec_json)
            gpus = spec.resources.total_gpus * concurrent_runs(spec)
            queue.append(QueueEntry(
                id=row.id, name=row.name, state=row.state, queue_reason=row.queue_reason if queued else None,
                position=sum(1 for e in queue if e.state == JobState.queued) + 1 if queued else None,
                demand_gpus=row.demand_gpus, gpus=gpus, created_at=row.created_at, started_at=row.started_at))
        views = []
        for tenant in tenants:
            jobs = by_tenant[tenant.name]
            active = [j for j in jobs if j.state != JobState.queued]
            views.append(TenantQueue(
                tenant=tenant.name, queued_jobs=len(jobs) - len(active), running_jobs=len(active),
                demand_gpus_in_use=sum(j.demand_gpus for j in active), gpus_in_use=sum(j.gpus for j in active),
                max_concurrent_jobs=tenant.max_concurrent_jobs, max_concurrent_gpus=tenant.max_concurrent_gpus,
                jobs=active + [j for j in jobs if j.state == JobState.queued]))
        node_gpus = sum(t.gpus for t in self.settings.node_types) if self.settings.node_types else None
        cluster = ClusterUsage(
            capacity_units=self.settings.capacity_gpus, node_gpus=node_gpus,
            demand_gpus_in_use=sum(v.demand_gpus_in_use for v in views), gpus_in_use=sum(v.gpus_in_use for v in views),
            running_jobs=sum(v.running_jobs for v in views), queued_jobs=sum(v.queued_jobs for v in views))
        return AdminQueue(cluster=cluster, tenants=views)

    def usage(self, tenant: str) -> UsageView:
        """What counts against the tenant's quotas now: GPU-seconds in the 30-day window (running attempts charged to
        their last heartbeat) and what remains, and stored bytes by kind (inputs of jobs not cancelled, ready adapters)."""
        now = self.clock()
        with self.db.read() as session:
            row = session.get(Tenant, tenant)
            if row is None:
                raise NotFound(f"no tenant {tenant!r}", "tenant")
            used = used_gpu_seconds(session, tenant, now)
            budget = budget_gpu_seconds(row.gpu_hours_per_30d)
            counts = dict(session.execute(select(Job.state, func.count()).where(Job.tenant == tenant).group_by(Job.state)).all())
            adapters = session.execute(select(func.count()).select_from(Adapter)
                                       .where(Adapter.tenant == tenant, Adapter.status == "ready")).scalar_one()
            inputs, adapter_bytes = stored_input_bytes(session, tenant), stored_adapter_bytes(session, tenant)
            return UsageView(tenant=tenant, gpu_seconds_30d=used, gpu_hours_budget_30d=row.gpu_hours_per_30d,
                             gpu_seconds_remaining_30d=max(0.0, budget - used) if budget != float("inf") else None,
                             running_jobs=sum(counts.get(s, 0) for s in ACTIVE), queued_jobs=counts.get(JobState.queued, 0),
                             adapters=adapters, stored_bytes=inputs + adapter_bytes, stored_input_bytes=inputs,
                             stored_adapter_bytes=adapter_bytes, max_stored_bytes=row.max_stored_bytes,
                             max_concurrent_jobs=row.max_concurrent_jobs, max_concurrent_gpus=row.max_concurrent_gpus,
                             max_adapters=row.max_adapters, generate_rpm=row.generate_rpm)
