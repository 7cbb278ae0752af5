"""A byte-bounded LRU cache of loaded adapters in host memory (pinned on CUDA), shared by eval and Serve.

Switching a resident base to a cached adapter is one host→device copy per tensor (in place, so compiled
graphs stay valid); a miss first reads and sha256-verifies the file. The bound is on the adapters' tensor
bytes, which is what occupies (page-locked) host memory; a full-mode SDXL adapter is ~1 GB.

With a shared `policy` (`causalt2i.slot_pool.RecencyPolicy`), the cache evicts by the same recency order the
device slot pool uses, so both tiers of a mixed-LoRA replica follow one policy; `on_evict` is then how the pool
learns that an adapter left the host tier (it frees its slot). Eviction is always an explicit call, never a
finaliser.

Loads run outside the lock, so a slow miss does not block hits on other adapters. Two threads that miss
the same key at once both load it; the second insert replaces the first (counted as two loads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from causalt2i.adapter import Adapter, load_adapter

AdapterLoader = Callable[[str | Path], Adapter]
EvictionCallback = Callable[[str, Adapter], None]


class AdapterCacheError(ValueError):
    """An adapter the cache cannot hold (larger than its whole capacity)."""


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    loads: int
    evictions: int
    entries: int
    nbytes: int
    capacity_bytes: int


class AdapterCache:
    """Adapters by key, least recently used evicted first once their bytes would exceed `capacity_bytes`.

    `get(key, source)` returns the cached adapter (a hit, which makes it the most recent) or loads it from
    `source` (the key itself when not given) with `loader`, pins it when `pin` and CUDA is available, and
    inserts it (a miss and a load). `on_evict(key, adapter)` runs for each eviction, outside the lock.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        loader: AdapterLoader = load_adapter,
        on_evict: EvictionCallback | None = None,
        pin: bool = True,
        policy=None,
    ):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._loader = loader
        self._on_evict = on_evict
        self._pin = pin
        self._policy = policy
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._loads = self._evictions = 0

    def get(self, key: str, source: str | Path | None = None) -> Adapter:
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                if self._policy is not None:
                    self._policy.touch(key)
                return adapter
            self._misses += 1
        adapter = self._loader(source if source is not None else key)
        with self._lock:
            self._loads += 1
        self.put(key, adapter)
        return adapter

    def put(self, key: str, adapter: Adapter) -> None:
        """Insert (or replace) `key` as the most recent entry, evicting the least recent ones to fit."""
        size = adapter.nbytes
        if size > self.capacity_bytes:
            raise AdapterCacheError(f"adapter {key!r} is {size:,} bytes; the cache holds at most {self.capacity_bytes:,} bytes")
        if self._pin:
            adapter.pin_memory()
        evicted: list[tuple[str, Adapter]] = []
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._nbytes -= previous.nbytes
            if self._policy is not None:
                self._policy.touch(key)
            while self._entries and self._nbytes + size > self.capacity_bytes:
                old_key = next(iter(self._entries)) if self._policy is None else self._policy.victim(self._entries)
                old = self._entries.pop(old_key)
                self._nbytes -= old.nbytes
                self._evictions += 1
                evicted.append((old_key, old))
            self._entries[key] = adapter
            self._nbytes += size
        for old_key, _ in evicted:
            if self._policy is not None:
                self._policy.forget(old_key)
        if self._on_evict is not None:
            for old_key, old in evicted:
                self._on_evict(old_key, old)

    def evict(self, key: str) -> bool:
        """Drop `key` (counted as an eviction, callback run); False when it was not cached."""
        with self._lock:
            adapter = self._entries.pop(key, None)
            if adapter is None:
                return False
            self._nbytes -= adapter.nbytes
            self._evictions += 1
        if self._policy is not None:
            self._policy.forget(key)
        if self._on_evict is not None:
            self._on_evict(key, adapter)
        return True

    def clear(self) -> None:
        for key in self.keys():
            self.evict(key)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                loads=self._loads,
                evictions=self._evictions,
                entries=len(self._entries),
                nbytes=self._nbytes,
                capacity_bytes=self.capacity_bytes,
            )
