"""The adapter registry: versions per (tenant, name), numbered 1, 2, 3… in the order they are registered."""

from __future__ import annotations

import json
import secrets

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from causalt2i.adapter_format import AdapterManifest

from cluster.db import Adapter, Tenant


class AdapterQuotaExceeded(RuntimeError):
    pass


def new_adapter_id() -> str:
    return "ad-" + secrets.token_hex(8)


def register_adapter_version(session: Session, *, adapter_id: str, tenant: str, name: str, uri: str, sha256: str,
                             size_bytes: int, manifest: AdapterManifest, job_id: str | None, now: float) -> int:
    """Insert the next version of `tenant/name`; returns its version number. Runs inside the caller's transaction."""
    limit = session.execute(select(Tenant.max_adapters).where(Tenant.name == tenant)).scalar_one()
    count = session.execute(select(func.count()).select_from(Adapter)
                            .where(Adapter.tenant == tenant, Adapter.status == "ready")).scalar_one()
    if count >= limit:
        raise AdapterQuotaExceeded(f"tenant {tenant} already has {count} of max_adapters={limit} adapters")
    for _ in range(5):
        version = 1 + session.execute(select(func.coalesce(func.max(Adapter.version), 0))
                                      .where(Adapter.tenant == tenant, Adapter.name == name)).scalar_one()
        try:
            with session.begin_nested():
                session.execute(insert(Adapter).values(
                    id=adapter_id, tenant=tenant, name=name, version=version, uri=uri, sha256=sha256, bytes=size_bytes,
                    base_model=manifest.base_model, base_fingerprint=manifest.base_fingerprint,
                    param_mode=manifest.param_mode, metrics_json=json.dumps(manifest.metrics or {}),
                    status="ready", job_id=job_id, created_at=now))
            return version
        except IntegrityError:
            continue  # another registration of the same name took this version number; take the next
    raise RuntimeError(f"could not allocate a version for adapter {tenant}/{name}")
