"""Concurrency caps for long requests: at most `per_tenant` held by one tenant and `total` by all tenants.

An SSE stream or a generate call holds its slot for its whole life (seconds to minutes); a GET holds none.
Past a tenant's cap the request is refused at once with 429 and `Retry-After` (that tenant is at its cap);
past the process's total, 503 with `Retry-After` (the replica is full for everyone). Nothing waits for a
slot: a refused client retries, so a tenant at its caps never queues in front of another tenant.

The totals are sized below the ingress deployment's `max_ongoing_requests` (`serve/app.py` checks it at
start), so the short requests (GETs, submits, `/healthz`) always find a Serve slot while every long slot
is taken. The caps are per process (per ingress replica); with R replicas a tenant holds at most R × cap.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from cluster.http import HTTPProblem


@dataclass
class Slot:
    """One held slot; `release` is idempotent, so a `finally` and a disconnect may both call it."""

    owner: "TenantSlots"
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self.tenant)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


class TenantSlots:
    """`acquire(tenant)` → a `Slot`, or `HTTPProblem` 429 (the tenant's cap) / 503 (the total) without waiting."""

    def __init__(self, what: str, *, per_tenant: int, total: int, retry_after_s: int, setting: str):
        if per_tenant < 1 or total < per_tenant:
            raise ValueError(f"{what}: need 1 <= per_tenant <= total, got {per_tenant} and {total}")
        self.what = what
        self.per_tenant = per_tenant
        self.total = total
        self.retry_after_s = retry_after_s
        self.setting = setting  # the setting that sets the per-tenant cap: the field a 429 names
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> Slot:
        retry = {"Retry-After": str(self.retry_after_s)}
        with self._lock:
            if self._held[tenant] >= self.per_tenant:
                raise HTTPProblem(429, self.setting, f"at most {self.per_tenant} {self.what} per tenant at once; "
                                                     f"one ends first (retry in {self.retry_after_s} s)", retry)
            if sum(self._held.values()) >= self.total:
                raise HTTPProblem(503, "request", f"this server holds its maximum of {self.total} {self.what}; "
                                                  f"retry in {self.retry_after_s} s", retry)
            self._held[tenant] += 1
        return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if self._held[tenant] <= 0:
                del self._held[tenant]

    def held(self, tenant: str | None = None) -> int:
        with self._lock:
            return sum(self._held.values()) if tenant is None else self._held[tenant]


@dataclass(frozen=True)
class RequestSlots:
    """The two kinds of long request an ingress bounds."""

    streams: TenantSlots
    generations: TenantSlots

    @classmethod
    def from_settings(cls, serve) -> "RequestSlots":
        """From `ServeSettings` (`cluster.config`)."""
        return cls(
            streams=TenantSlots("open event streams", per_tenant=serve.max_streams_per_tenant, total=serve.max_streams,
                                retry_after_s=serve.busy_retry_after_s, setting="serve.max_streams_per_tenant"),
            generations=TenantSlots("generate requests in flight", per_tenant=serve.max_generations_per_tenant,
                                    total=serve.max_generations, retry_after_s=serve.busy_retry_after_s,
                                    setting="serve.max_generations_per_tenant"))

    @property
    def long_slots(self) -> int:
        """Serve slots the long requests can hold at most, all tenants together."""
        return self.streams.total + self.generations.total
