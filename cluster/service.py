"""The control plane's operations. The REST API and the CLI both call these and nothing else.

Scoping: every read or write of a job or adapter takes the caller's tenant (None for an admin) and filters
on it in SQL, so another tenant's object is indistinguishable from a missing one (`NotFound`, 404).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from causalt2i.spec import SpecError, TuningSpec, parse_spec
from cluster import auth
from cluster.config import ControlPlaneSettings
from cluster.db import Adapter, ApiKey, Database, Job, JobEvent, Tenant, UsageRecord, database_for
from cluster.schemas import (
    AdapterView, CreatedKey, EventView, JobView, KeyView, Quotas, TenantView, UsageView,
)
from cluster.states import ACTIVE, TERMINAL, add_event, end_attempt, transition
from cluster.store import ArtifactCorrupt, ArtifactNotFound, ArtifactStore, StorePathError, safe_part

INPUTS = "inputs"
THIRTY_DAYS_S = 30 * 24 * 3600.0


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, field: str = ""):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


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


def job_demand_gpus(spec: TuningSpec) -> float:
    """Capacity units a job holds: its GPUs, or one unit per worker for a CPU-only job."""
    return spec.resources.total_gpus or float(spec.resources.num_workers)


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

    def set_webhook(self, name: str, url: str | None, secret: str | None = None) -> TenantView:
        from cluster.webhooks import WebhookRefused, check_webhook_url

        if url is not None:
            try:
                check_webhook_url(url, self.settings.webhook_allow_hosts)
            except WebhookRefused as err:
                raise InvalidInput(str(err), "url") from None
        with self.db.write() as session:
            tenant = session.get(Tenant, name)
            if tenant is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            # Start after the newest event: a new webhook is not flooded with history.
            cursor = session.execute(select(func.coalesce(func.max(JobEvent.id), 0)).where(JobEvent.tenant == name)).scalar_one()
            tenant.webhook_url = url
            tenant.webhook_secret = (secret or secrets.token_hex(32)) if url else None
            tenant.webhook_cursor, tenant.webhook_attempts, tenant.webhook_next_at = cursor, 0, 0.0
        return self.get_tenant(name)

    def webhook_secret(self, name: str) -> str | None:
        with self.db.read() as session:
            row = session.get(Tenant, name)
            if row is None:
                raise NotFound(f"no tenant {name!r}", "tenant")
            return row.webhook_secret

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

    def submit(self, tenant: str | None, spec_data: object, images: dict[str, bytes]) -> JobView:
        """Validate, store the images with the job, and queue it. `tenant` None = admin (spec.tenant is used).

        Nothing is stored unless everything is valid; image names in the spec refer to keys of `images`.
        """
        limits = self.settings
        if not isinstance(images, dict):
            raise InvalidInput("must map image names to bytes", "images")
        if len(images) > limits.max_images_per_job:
            raise InvalidInput(f"{len(images)} images; at most {limits.max_images_per_job} per job", "images")
        for name, data in images.items():
            try:
                safe_part(name, f"images.{name}")
            except StorePathError as err:
                raise InvalidInput(str(err).split(": ", 1)[1], err.field) from None
            if PurePosixPath(name).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
                raise InvalidInput("not a JPEG, PNG or WebP file name", f"images.{name}")
            if len(data) > limits.max_image_bytes:
                raise InvalidInput(f"{len(data)} bytes; at most {limits.max_image_bytes} per image", f"images.{name}")
        try:
            spec = parse_spec(spec_data, check_files=False)
        except SpecError as err:
            raise InvalidInput(err.message, err.field) from None
        if tenant is not None and spec.tenant != tenant:
            raise InvalidInput(f"must be your own tenant {tenant!r}", "tenant")
        referenced: set[str] = set()
        for i, subject in enumerate(spec.subjects):
            for j, name in enumerate(subject.images):
                field = f"subjects.{i}.images.{j}"
                try:
                    safe_part(name, field)
                except StorePathError as err:
                    raise InvalidInput(str(err).split(": ", 1)[1], field) from None
                if name not in images:
                    raise InvalidInput(f"{name!r} was not uploaded", field)
                referenced.add(name)
        unreferenced = sorted(set(images) - referenced)
        if unreferenced:
            raise InvalidInput(f"uploaded but not used by the spec: {', '.join(unreferenced)}", "images")
        for name in sorted(referenced):
            validate_image(images[name], name)

        demand = job_demand_gpus(spec)
        input_bytes = sum(len(images[n]) for n in referenced)
        now = self.clock()
        with self.db.read() as session:
            row = session.get(Tenant, spec.tenant)
            if row is None:
                raise NotFound(f"no tenant {spec.tenant!r}", "tenant")
            if demand > row.max_concurrent_gpus:
                raise InvalidInput(f"needs {demand:g} GPUs; the tenant's max_concurrent_gpus is {row.max_concurrent_gpus:g}",
                                   "resources")
            stored = self._stored_bytes(session, spec.tenant)
            if stored + input_bytes > row.max_stored_bytes:
                raise QuotaExceeded(f"storing {input_bytes} more bytes would exceed max_stored_bytes={row.max_stored_bytes} "
                                    f"({stored} used)", "tenant.max_stored_bytes")
            adapters = session.execute(select(func.count()).select_from(Adapter)
                                       .where(Adapter.tenant == spec.tenant, Adapter.status == "ready")).scalar_one()
            if adapters >= row.max_adapters:
                raise QuotaExceeded(f"{adapters} adapters of max_adapters={row.max_adapters}; delete one first",
                                    "tenant.max_adapters")

        job_id = "job-" + secrets.token_hex(6)
        self.store.publish_files(spec.tenant, ("jobs", job_id, INPUTS), {n: images[n] for n in referenced})
        try:
            with self.db.write() as session:
                session.execute(insert(Job).values(
                    id=job_id, tenant=spec.tenant, name=spec.name, spec_json=json.dumps(spec.model_dump(mode="json")),
                    state="queued", attempts=0, max_attempts=limits.max_attempts, demand_gpus=demand, input_bytes=input_bytes,
                    created_at=now, updated_at=now, progress_total=spec.total_steps))
                add_event(session, job_id=job_id, tenant=spec.tenant, at=now, kind="state", state="queued",
                          message="submitted", data={"attempt": 0})
        except BaseException:
            self.store.delete(spec.tenant, "jobs", job_id, INPUTS)
            raise
        self._notify(job_id)
        return self.get_job(tenant, job_id)

    @staticmethod
    def _stored_bytes(session, tenant: str) -> int:
        adapters = session.execute(select(func.coalesce(func.sum(Adapter.bytes), 0))
                                   .where(Adapter.tenant == tenant, Adapter.status == "ready")).scalar_one()
        inputs = session.execute(select(func.coalesce(func.sum(Job.input_bytes), 0)).where(Job.tenant == tenant)).scalar_one()
        return int(adapters) + int(inputs)

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

    def list_jobs(self, tenant: str | None, *, state: str | None = None, limit: int = 100) -> list[JobView]:
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
            if job.state == "queued":
                ok = transition(session, job_id, expected="queued", to="cancelled", now=now, message="cancelled by request")
            else:
                ok = end_attempt(session, job, to="cancelled", now=now, half_life_s=self.settings.fair_share_half_life_s,
                                 message="cancelled by request")
            if not ok:
                raise Conflict("job changed state meanwhile; retry", "state")
        self._notify(job_id)
        return self.get_job(tenant, job_id)

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
        """One file of an adapter, sha256-verified (download; what serving loads)."""
        view = self.get_adapter(tenant, adapter_id)
        try:
            safe_part(filename, "filename")
            parts = self.store.parse_uri(view.uri, view.tenant)
            return self.store.read_file(view.tenant, parts, filename)
        except StorePathError as err:
            raise InvalidInput(str(err).split(": ", 1)[1], err.field) from None
        except ArtifactNotFound:
            raise NotFound(f"adapter {adapter_id!r} has no file {filename!r}", "filename") from None
        except ArtifactCorrupt as err:
            raise ServiceError(f"stored adapter failed its sha256 check: {err}", "id") from None

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

    def usage(self, tenant: str) -> UsageView:
        now = self.clock()
        with self.db.read() as session:
            row = session.get(Tenant, tenant)
            if row is None:
                raise NotFound(f"no tenant {tenant!r}", "tenant")
            used = session.execute(select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0))
                                   .where(UsageRecord.tenant == tenant, UsageRecord.ended_at >= now - THIRTY_DAYS_S)).scalar_one()
            counts = dict(session.execute(select(Job.state, func.count()).where(Job.tenant == tenant).group_by(Job.state)).all())
            adapters = session.execute(select(func.count()).select_from(Adapter)
                                       .where(Adapter.tenant == tenant, Adapter.status == "ready")).scalar_one()
            return UsageView(tenant=tenant, gpu_seconds_30d=float(used), gpu_hours_budget_30d=row.gpu_hours_per_30d,
                             running_jobs=sum(counts.get(s, 0) for s in ACTIVE), queued_jobs=counts.get("queued", 0),
                             adapters=adapters, stored_bytes=self._stored_bytes(session, tenant))
