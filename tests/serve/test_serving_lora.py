"""Issue 15 end to end: eight tenants' LoRA adapters served concurrently through the HTTP ingress and Ray Serve,
mixed into shared forward passes from the Generator's slot pool (ADAPTER_SLOTS slots, so eight tenants also
evict one another), each answer equal to that tenant's image generated alone by `causalt2i` directly.

Tolerance as in tests/serve/test_mixed_batching.py: merged (direct) and unmerged (slot) LoRA round differently
in fp32 and the tiny U-Net is not batch-invariant on CPU, so each pixel may differ by 1 of 255 and at most 1% of
pixels differ at all; two tenants' images at the same seed differ by tens of levels (checked below).
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from cluster.schemas import Quotas
from tests.serve.adapters import publish
from tests.serve.conftest import ADAPTER_SLOTS, png_pixels
from tests.serve.test_serving import PROMPT, generate_png

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

LORA_TENANTS = tuple(f"lora{i}" for i in range(8))


@pytest.fixture(scope="module")
def lora_tenants(serving) -> dict[str, str]:
    """Eight tenants, each with a LoRA adapter `<tenant>/pets` of its own (ranks 2–4); tenant → adapter id."""
    import torch

    from causalt2i.models import load_sdxl
    from tests.causalt2i.lora_adapters import write_lora_adapter

    torch.set_num_threads(1)
    parts = load_sdxl("tiny")
    adapters = {}
    for index, tenant in enumerate(LORA_TENANTS):
        serving.plane.create_tenant(tenant, Quotas(generate_rpm=100_000))
        serving.keys[tenant] = serving.plane.create_key("tenant", tenant).key
        source = write_lora_adapter(serving.work / "lora-adapters" / tenant, parts, tenant=tenant, name="pets",
                                    seed=60 + index, rank=2 + index % 3)
        adapters[tenant] = publish(serving.plane, tenant, "pets", source)
        serving.adapter_dirs[adapters[tenant]] = source
    return adapters


def test_eight_lora_tenants_concurrently_through_the_ingress_each_get_their_own_subjects(serving, references, lora_tenants):
    before = serving.generator_stats()
    jobs = [(tenant, 700 + i) for i, tenant in enumerate(LORA_TENANTS * 2)]

    def one(job):
        tenant, seed = job
        return job, generate_png(serving, tenant, f"{tenant}/pets", seed=seed)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    after = serving.generator_stats()
    for (tenant, seed), response in results:
        assert response.status_code == 200, response.text
        assert response.headers["x-ct2i-adapter"] == lora_tenants[tenant]
        assert "x-ct2i-time-mixed-activate" in response.headers, (tenant, dict(response.headers))  # the slot pool served it
        expected = references.image(lora_tenants[tenant], seed, PROMPT).astype(np.int16)
        diff = np.abs(png_pixels(response.content).astype(np.int16) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (tenant, seed, int(diff.max()), float((diff > 0).mean()))
        other = LORA_TENANTS[(LORA_TENANTS.index(tenant) + 1) % len(LORA_TENANTS)]
        assert np.abs(references.image(lora_tenants[other], seed, PROMPT).astype(np.int16) - expected).max() > 10
    mixed = after["totals"].get("batches_mixed", 0) - before["totals"].get("batches_mixed", 0)
    shared = sum(count for adapters, count in after["adapters_per_batch"].items() if int(adapters) >= 2) - \
        sum(count for adapters, count in before["adapters_per_batch"].items() if int(adapters) >= 2)
    evicted = after["slot_evictions"] - before["slot_evictions"]
    print(f"{mixed} mixed passes, {shared} of them with several adapters, {evicted} slot evictions")
    assert mixed >= 1 and shared >= 1  # tenants' requests really shared forward passes
    assert evicted >= len(LORA_TENANTS) - ADAPTER_SLOTS  # eight tenants over ADAPTER_SLOTS slots: reloads were exercised
