"""The serving layer's Prometheus metrics, through Ray's metrics API (`ray.util.metrics`).

Ray exports them from each node's metrics agent with the `ray_` prefix, e.g. `ray_ct2i_serve_requests_total`.
Every recorder also keeps its own totals in process (`snapshot()`), which the tests read (`/healthz` reports none of them): the
Prometheus path needs Ray's metrics agent, which a test cluster without a dashboard may not run.

| metric | kind | tags |
| --- | --- | --- |
| `ct2i_serve_requests_total` | counter | route, status, tenant |
| `ct2i_serve_request_seconds` | histogram | route |
| `ct2i_adapter_cache_hits_total`, `_misses_total`, `_loads_total`, `_evictions_total` | counter | — |
| `ct2i_adapter_cache_bytes` | gauge | — |
| `ct2i_generate_batch_size` | histogram | path (mixed, swap) |
| `ct2i_generate_adapters_per_batch` | histogram | path |
| `ct2i_lora_slot_hits_total`, `_misses_total` | counter | — |
| `ct2i_lora_slot_activation_seconds` | histogram | — |
| `ct2i_generate_queue_wait_seconds` | histogram | tenant, path |
| `ct2i_generate_abandoned_total` | counter | reason (cancelled, timeout) |
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from typing import Any

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 16]
ACTIVATION_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]
QUEUE_WAIT_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def _ray_metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries: list[float] | None = None) -> Any:
    """A `ray.util.metrics` object, or None outside a Ray worker (the in-process totals still count)."""
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        if kind == "histogram":
            return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
        return getattr(metrics, kind.capitalize())(name, description=description, tag_keys=tag_keys)
    except Exception:  # metrics must never take a request down
        return None


class IngressMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Tally = Tally()
        self._requests = _ray_metric("counter", "ct2i_serve_requests_total", "HTTP requests to the generate routes",
                                     ("route", "status", "tenant"))
        self._latency = _ray_metric("histogram", "ct2i_serve_request_seconds", "end-to-end latency of generate routes",
                                    ("route",), LATENCY_BUCKETS_S)

    def request(self, route: str, status: int, tenant: str, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
        try:
            if self._requests is not None:
                self._requests.inc(1, tags={"route": route, "status": str(status), "tenant": tenant or "-"})
            if self._latency is not None:
                self._latency.observe(seconds, tags={"route": route})
        except Exception:
            pass

    def snapshot(self) -> dict:
        with self._lock:
            return {f"{route} {status}": count for (route, status), count in sorted(self.requests.items())}


class GeneratorMetrics:
    """Adapter-cache counters are fed as differences of `AdapterCache.stats`, so they match the cache exactly."""

    def __init__(self):
        self._lock = threading.Lock()
        self.totals: Tally = Tally()
        self.batch_sizes: Tally = Tally()
        self._counters = {name: _ray_metric("counter", f"ct2i_adapter_cache_{name}_total", f"adapter cache {name}")
                          for name in ("hits", "misses", "loads", "evictions")}
        self._bytes = _ray_metric("gauge", "ct2i_adapter_cache_bytes", "bytes of adapters held in the host cache")
        self.adapters_per_batch: Tally = Tally()
        self.queue_waits: dict[str, list[float]] = {}  # per tenant: [count, total seconds, max seconds]
        self.activation_seconds = 0.0
        self._batch = _ray_metric("histogram", "ct2i_generate_batch_size", "requests per generator batch", ("path",), BATCH_BUCKETS)
        self._adapters = _ray_metric("histogram", "ct2i_generate_adapters_per_batch", "distinct adapters per generator pass",
                                     ("path",), BATCH_BUCKETS)
        self._slot = {name: _ray_metric("counter", f"ct2i_lora_slot_{name}_total", f"LoRA slot pool {name}") for name in ("hits", "misses")}
        self._activation = _ray_metric("histogram", "ct2i_lora_slot_activation_seconds", "time to make an adapter resident in a slot",
                                       (), ACTIVATION_BUCKETS_S)
        self._queue_wait = _ray_metric("histogram", "ct2i_generate_queue_wait_seconds", "time a request waited for its pass",
                                       ("tenant", "path"), QUEUE_WAIT_BUCKETS_S)
        self._abandoned = _ray_metric("counter", "ct2i_generate_abandoned_total", "batches stopped early", ("reason",))
        self._last: dict[str, int] = {}

    def cache(self, stats) -> None:
        with self._lock:
            deltas = {}
            for name in ("hits", "misses", "loads", "evictions"):
                value = getattr(stats, name)
                deltas[name] = value - self._last.get(name, 0)
                self._last[name] = value
                self.totals[f"cache_{name}"] += deltas[name]
        try:
            for name, delta in deltas.items():
                if delta and self._counters[name] is not None:
                    self._counters[name].inc(delta)
            if self._bytes is not None:
                self._bytes.set(stats.nbytes)
        except Exception:
            pass

    def batch(self, size: int, *, adapters: int = 1, path: str = "swap") -> None:
        with self._lock:
            self.batch_sizes[size] += 1
            self.adapters_per_batch[adapters] += 1
            self.totals[f"batches_{path}"] += 1
        try:
            if self._batch is not None:
                self._batch.observe(size, tags={"path": path})
            if self._adapters is not None:
                self._adapters.observe(adapters, tags={"path": path})
        except Exception:
            pass

    def slot(self, hit: bool, seconds: float) -> None:
        """One adapter made resident for a mixed pass: a hit (already in its slot) or a miss (copied in)."""
        name = "hits" if hit else "misses"
        with self._lock:
            self.totals[f"slot_{name}"] += 1
            self.activation_seconds += seconds
        try:
            if self._slot[name] is not None:
                self._slot[name].inc(1)
            if self._activation is not None and not hit:
                self._activation.observe(seconds)
        except Exception:
            pass

    def queue_wait(self, tenant: str, seconds: float, path: str) -> None:
        with self._lock:
            count, total, longest = self.queue_waits.get(tenant, [0, 0.0, 0.0])
            self.queue_waits[tenant] = [count + 1, total + seconds, max(longest, seconds)]
        try:
            if self._queue_wait is not None:
                self._queue_wait.observe(seconds, tags={"tenant": tenant or "-", "path": path})
        except Exception:
            pass

    def abandoned(self, reason: str) -> None:
        with self._lock:
            self.totals[f"abandoned_{reason}"] += 1
        try:
            if self._abandoned is not None:
                self._abandoned.inc(1, tags={"reason": reason})
        except Exception:
            pass

    def snapshot(self) -> dict:
        with self._lock:
            return {"totals": dict(self.totals), "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "adapters_per_batch": {str(k): v for k, v in sorted(self.adapters_per_batch.items())},
                    "slot_activation_seconds": self.activation_seconds,
                    "queue_wait": {tenant: {"requests": c, "mean_s": t / c, "max_s": m} for tenant, (c, t, m) in sorted(self.queue_waits.items())}}
