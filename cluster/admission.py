"""Fair-share admission: which queued job gets the next free GPUs. Pure logic; no database, no Ray, no clock.

Order. Tenants are served by least recent GPU-seconds per unit of weight,

    key(tenant) = recent_gpu_s(tenant) / weight(tenant),

where `recent_gpu_s` is the exponentially decayed usage of finished attempts plus the in-flight jobs,
each charged `gpus × max(elapsed, min_charge_s)` (so a tenant that was just admitted does not look idle
and win every slot freed in the same tick). Within a tenant jobs run FIFO: only the tenant's oldest
queued job (its head) is ever considered.

Quotas. A head is held back, with a reason, when its tenant is at max concurrent jobs, would exceed
max concurrent GPUs, or has used its GPU-hours for the last 30 days.

Starvation. A head that was first refused for want of free GPUs `starvation_after_s` or more ago is
considered before fair share, longest-refused first; if it still does not fit, admission stops there
(the freed GPUs are reserved for it) instead of letting smaller jobs backfill forever. The clock starts
at the first refusal for capacity, not at submission, so a flooded queue does not turn into plain FIFO.

`FairShareQueue` is incremental: `push`, `remove` and `set_tenant` are O(log T), and one `decide` call costs
O(k log T) for k tenants looked at, so a decision stays cheap with 10,000 jobs queued by 1,000 tenants.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

EPSILON_GPUS = 1e-9
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class QueuedJob:
    id: str
    tenant: str
    demand_gpus: float
    enqueued_at: float


@dataclass
class TenantState:
    """A tenant's limits and current use, as the admission logic sees them."""

    name: str
    weight: float = 1.0
    max_concurrent_jobs: int = 2
    max_concurrent_gpus: float = 8.0
    gpu_hours_per_30d: float = math.inf
    running_jobs: int = 0
    running_gpus: float = 0.0
    recent_gpu_s: float = 0.0
    used_30d_gpu_s: float = 0.0

    @property
    def fair_key(self) -> float:
        return self.recent_gpu_s / self.weight


@dataclass(frozen=True)
class AdmissionPolicy:
    min_charge_s: float = 60.0
    starvation_after_s: float = 600.0


@dataclass
class Decision:
    admitted: list[QueuedJob] = field(default_factory=list)
    # Why a job that was looked at stays queued (job id → reason). Only tenants' heads get a reason.
    reasons: dict[str, str] = field(default_factory=dict)


def quota_block(tenant: TenantState, job: QueuedJob, capacity_gpus: float) -> str | None:
    """The reason `job` cannot start now whatever the free capacity, or None."""
    if job.demand_gpus > capacity_gpus + EPSILON_GPUS:
        return f"needs {job.demand_gpus:g} GPUs but the cluster's capacity is {capacity_gpus:g}"
    if job.demand_gpus > tenant.max_concurrent_gpus + EPSILON_GPUS:
        return f"needs {job.demand_gpus:g} GPUs but the tenant's max_concurrent_gpus is {tenant.max_concurrent_gpus:g}"
    if tenant.used_30d_gpu_s >= tenant.gpu_hours_per_30d * SECONDS_PER_HOUR:
        return (f"tenant over its GPU-hour budget: used {tenant.used_30d_gpu_s / SECONDS_PER_HOUR:.2f} of "
                f"{tenant.gpu_hours_per_30d:g} GPU-hours in the last 30 days")
    if tenant.running_jobs >= tenant.max_concurrent_jobs:
        return f"tenant at its concurrency limit: {tenant.running_jobs} of {tenant.max_concurrent_jobs} jobs running"
    if tenant.running_gpus + job.demand_gpus > tenant.max_concurrent_gpus + EPSILON_GPUS:
        return (f"tenant at its GPU limit: {tenant.running_gpus:g} of {tenant.max_concurrent_gpus:g} GPUs in use, "
                f"job needs {job.demand_gpus:g}")
    return None


class FairShareQueue:
    def __init__(self, policy: AdmissionPolicy | None = None, blocked_since: dict[str, float] | None = None):
        self.policy = policy or AdmissionPolicy()
        # job id → when it was first refused for capacity. Pass the same dict to the next queue built by
        # a scheduler that rebuilds from the database each tick, so the aging survives the rebuild.
        self.blocked_since = {} if blocked_since is None else blocked_since
        self._queues: dict[str, deque[QueuedJob]] = {}
        self._tenants: dict[str, TenantState] = {}
        self._version: dict[str, int] = {}
        self._blocked: set[str] = set()  # quota-blocked until set_tenant() says otherwise
        self._removed: set[str] = set()
        self._fair_heap: list[tuple[float, str, int]] = []
        self._age_heap: list[tuple[float, str, int]] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def tenant(self, name: str) -> TenantState:
        return self._tenants[name]

    def _head(self, tenant: str) -> QueuedJob | None:
        queue = self._queues.get(tenant)
        while queue and queue[0].id in self._removed:
            self._removed.discard(queue.popleft().id)
        return queue[0] if queue else None

    def _reindex(self, tenant: str) -> None:
        """Invalidate the tenant's heap entries and push fresh ones for its current head."""
        version = self._version.get(tenant, 0) + 1
        self._version[tenant] = version
        head = self._head(tenant)
        if head is None or tenant in self._blocked or tenant not in self._tenants:
            return
        heapq.heappush(self._fair_heap, (self._tenants[tenant].fair_key, tenant, version))
        if head.id in self.blocked_since:
            heapq.heappush(self._age_heap, (self.blocked_since[head.id], tenant, version))

    def set_tenant(self, state: TenantState) -> None:
        self._tenants[state.name] = state
        self._blocked.discard(state.name)
        self._reindex(state.name)

    def push(self, job: QueuedJob) -> None:
        if job.tenant not in self._tenants:
            self._tenants[job.tenant] = TenantState(name=job.tenant)
        queue = self._queues.setdefault(job.tenant, deque())
        was_empty = self._head(job.tenant) is None
        queue.append(job)
        self._size += 1
        if was_empty:
            self._reindex(job.tenant)

    def extend(self, jobs: Iterable[QueuedJob]) -> None:
        for job in sorted(jobs, key=lambda j: (j.enqueued_at, j.id)):
            self.push(job)

    def remove(self, job: QueuedJob) -> None:
        """Drop a queued job (cancelled). Lazy: it is skipped when it reaches the head."""
        head = self._head(job.tenant)
        self._removed.add(job.id)
        self.blocked_since.pop(job.id, None)
        self._size -= 1
        if head is not None and head.id == job.id:
            self._reindex(job.tenant)

    def _valid(self, entry: tuple[float, str, int]) -> bool:
        _, tenant, version = entry
        return self._version.get(tenant) == version and tenant not in self._blocked

    def _peek_aged(self, now: float, parked: set[str]) -> str | None:
        heap = self._age_heap
        while heap and (not self._valid(heap[0]) or heap[0][1] in parked):
            if heap[0][1] in parked and self._valid(heap[0]):
                return None  # the oldest head was already refused this round; nothing older remains
            heapq.heappop(heap)
        if heap and now - heap[0][0] >= self.policy.starvation_after_s:
            return heap[0][1]
        return None

    def _pop_fair(self) -> str | None:
        heap = self._fair_heap
        while heap:
            entry = heapq.heappop(heap)
            if self._valid(entry):
                return entry[1]
        return None

    def decide(self, free_gpus: float, capacity_gpus: float, now: float) -> Decision:
        """Admit heads while GPUs are free; admitted jobs leave the queue and are charged to their tenant."""
        decision = Decision()
        parked: set[str] = set()
        while free_gpus > EPSILON_GPUS:
            tenant_name = self._peek_aged(now, parked)
            aged = tenant_name is not None
            if not aged:
                tenant_name = self._pop_fair()
                if tenant_name is None:
                    break
            head = self._head(tenant_name)
            tenant = self._tenants[tenant_name]
            reason = quota_block(tenant, head, capacity_gpus)
            if reason is not None:
                decision.reasons[head.id] = reason
                self._blocked.add(tenant_name)
                continue
            if head.demand_gpus > free_gpus + EPSILON_GPUS:
                if aged:
                    decision.reasons[head.id] = (f"capacity reserved: waiting for {head.demand_gpus:g} GPUs "
                                                 f"({free_gpus:g} free) after {now - head.enqueued_at:.0f} s in the queue")
                    self._reindex(tenant_name)
                    break
                decision.reasons[head.id] = f"waiting for capacity: needs {head.demand_gpus:g} GPUs, {free_gpus:g} free"
                self.blocked_since.setdefault(head.id, now)
                parked.add(tenant_name)
                continue
            self._queues[tenant_name].popleft()
            self._size -= 1
            self.blocked_since.pop(head.id, None)
            free_gpus -= head.demand_gpus
            tenant.running_jobs += 1
            tenant.running_gpus += head.demand_gpus
            tenant.recent_gpu_s += head.demand_gpus * self.policy.min_charge_s
            decision.admitted.append(head)
            self._reindex(tenant_name)
        for tenant_name in parked:
            self._reindex(tenant_name)
        # Heads the loop never reached because capacity ran out still say why they wait.
        for name, queue in self._queues.items():
            if queue and queue[0].id not in decision.reasons and queue[0].demand_gpus > free_gpus + EPSILON_GPUS:
                decision.reasons[queue[0].id] = f"waiting for capacity: needs {queue[0].demand_gpus:g} GPUs, {max(free_gpus, 0):g} free"
        return decision
