"""The byte-bounded LRU adapter cache: bound, order, counters, eviction callback, real loads."""

from __future__ import annotations

import pytest
import torch

from causalt2i.adapter import Adapter
from causalt2i.adapter_cache import AdapterCache, AdapterCacheError

KIB = 1024


@pytest.fixture
def make_adapter(cat_dog_adapter):
    """Adapters of a chosen size (float32 tensors), sharing a real manifest; `loads` records each source."""
    loads: list[str] = []

    def build(nbytes: int) -> Adapter:
        return Adapter(manifest=cat_dog_adapter.manifest, tensors={"t": torch.zeros(nbytes // 4, dtype=torch.float32)})

    def loader(source) -> Adapter:
        loads.append(str(source))
        return build(int(str(source).split(":")[1]) * KIB)

    build.loader = loader
    build.loads = loads
    return build


def test_byte_bound_is_respected_and_least_recently_used_goes_first(make_adapter):
    evicted = []
    cache = AdapterCache(10 * KIB, loader=make_adapter.loader, on_evict=lambda key, adapter: evicted.append((key, adapter.nbytes)))
    cache.get("a", "a:4")
    cache.get("b", "b:4")
    assert cache.keys() == ["a", "b"] and cache.nbytes == 8 * KIB
    cache.get("a")  # a hit makes "a" the most recent, so "b" is now the least recent
    assert cache.keys() == ["b", "a"]
    cache.get("c", "c:4")  # 12 KiB would exceed 10 KiB: "b" goes, not "a"
    assert cache.keys() == ["a", "c"]
    assert evicted == [("b", 4 * KIB)]
    assert cache.nbytes == 8 * KIB <= cache.capacity_bytes
    cache.get("d", "d:9")  # needs both others out
    assert cache.keys() == ["d"] and cache.nbytes == 9 * KIB
    assert [key for key, _ in evicted] == ["b", "a", "c"]


def test_counters_count_hits_misses_loads_and_evictions(make_adapter):
    cache = AdapterCache(8 * KIB, loader=make_adapter.loader)
    first = cache.get("a", "a:4")
    assert cache.get("a", "a:4") is first
    cache.get("b", "b:4")
    cache.get("c", "c:4")  # evicts "a"
    cache.get("a", "a:4")  # a miss again: it is reloaded, evicting "b"
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.loads, stats.evictions) == (1, 4, 4, 2)
    assert (stats.entries, stats.nbytes, stats.capacity_bytes) == (2, 8 * KIB, 8 * KIB)
    assert make_adapter.loads == ["a:4", "b:4", "c:4", "a:4"]


def test_replacing_a_key_does_not_double_count_its_bytes(make_adapter):
    cache = AdapterCache(10 * KIB, loader=make_adapter.loader)
    cache.put("a", make_adapter(4 * KIB))
    cache.put("a", make_adapter(6 * KIB))
    assert cache.nbytes == 6 * KIB and len(cache) == 1 and cache.stats.evictions == 0


def test_an_adapter_larger_than_the_cache_is_refused_and_nothing_is_evicted(make_adapter):
    cache = AdapterCache(8 * KIB, loader=make_adapter.loader)
    cache.get("a", "a:4")
    with pytest.raises(AdapterCacheError, match="at most 8,192 bytes"):
        cache.get("huge", "huge:9")
    assert cache.keys() == ["a"] and cache.stats.evictions == 0


def test_explicit_evict_and_clear_run_the_callback(make_adapter):
    evicted = []
    cache = AdapterCache(16 * KIB, loader=make_adapter.loader, on_evict=lambda key, adapter: evicted.append(key))
    cache.get("a", "a:4")
    cache.get("b", "b:4")
    assert cache.evict("a") is True and cache.evict("a") is False
    cache.clear()
    assert evicted == ["a", "b"] and len(cache) == 0 and cache.nbytes == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity_bytes"):
        AdapterCache(0)


def test_default_loader_reads_a_verified_adapter_folder(cat_dog_adapter_dir, cat_dog_adapter):
    cache = AdapterCache(1 << 30)
    loaded = cache.get("tenant/cat-dog@1", cat_dog_adapter_dir)
    assert loaded.manifest.tensors_sha256 == cat_dog_adapter.manifest.tensors_sha256
    assert cache.nbytes == loaded.nbytes == cat_dog_adapter.nbytes > 0
    assert cache.get("tenant/cat-dog@1") is loaded
    assert (cache.stats.hits, cache.stats.loads) == (1, 1)
