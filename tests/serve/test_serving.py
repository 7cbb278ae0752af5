"""The serving contract over real HTTP on a local Serve: no bleed between tenants, eviction, concurrency,
auth and isolation, rate limits, bad input, the registry's changes taking effect at once. (The 200-request load
run is `bench/bench_serve.py --load 200`.)

Tolerance: a request that ran alone in its forward pass equals direct `causalt2i` generation bit for bit
(same code, same weights, the seed fixes the noise). Requests that Serve batched together run as one
larger batch, whose float32 kernels may round differently: there each pixel may differ by at most 1 of 255
(measured: 0 or 1), while two different adapters' images differ by tens of levels at the same seed.
"""

from __future__ import annotations

import base64
import concurrent.futures
import time

import httpx
import pytest

from tests.serve.conftest import (
    ADAPTER_SLOTS, LIMITED_RPM, LIMITED_TENANT, SIDE, STEPS, TENANTS, max_abs_diff, png_pixels,
)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PROMPT = "a photo of <s1> cat"
BATCHED_TOLERANCE = 1


def body(adapter: str, seed: int, **overrides) -> dict:
    request = {"adapter": adapter, "prompt": PROMPT, "steps": STEPS, "guidance_scale": 5.0, "seed": seed, "width": SIDE,
               "height": SIDE}
    request.update(overrides)
    return request


def generate_png(serving, tenant: str, adapter: str, seed: int, **overrides) -> httpx.Response:
    with serving.client(tenant) as client:
        return client.post("/v1/generate", json=body(adapter, seed, **overrides))


def test_interleaved_tenants_never_bleed(serving, references):
    a, b = TENANTS[0], TENANTS[1]
    ids = {a: serving.adapters[a], b: serving.adapters[b]}
    # The two adapters really do give different images, so a swap that leaked would be seen.
    assert max_abs_diff(references.image(ids[a], 0, PROMPT), references.image(ids[b], 0, PROMPT)) > 20
    for i in range(20):
        tenant = (a, b)[i % 2]
        response = generate_png(serving, tenant, f"{tenant}/pets", seed=i)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-ct2i-adapter"] == ids[tenant]
        assert int(response.headers["x-ct2i-seed"]) == i
        assert "denoise;dur=" in response.headers["server-timing"]
        assert max_abs_diff(png_pixels(response.content), references.image(ids[tenant], i, PROMPT)) == 0, (i, tenant)


def test_cycling_more_adapters_than_slots_evicts_and_stays_right(serving, references):
    tenants = TENANTS[: ADAPTER_SLOTS + 1]
    before = serving.generator_stats()
    for round_ in range(3):
        for tenant in tenants:
            seed = 100 + round_
            response = generate_png(serving, tenant, serving.adapters[tenant], seed=seed)
            assert response.status_code == 200, response.text
            assert max_abs_diff(png_pixels(response.content), references.image(serving.adapters[tenant], seed, PROMPT)) == 0
            stats = serving.generator_stats()
            assert stats["nbytes"] <= serving.cache_bytes
            assert stats["entries"] <= ADAPTER_SLOTS
    after = serving.generator_stats()
    assert after["capacity_bytes"] == serving.cache_bytes
    assert after["evictions"] - before["evictions"] >= 3 * len(tenants) - ADAPTER_SLOTS - 1
    assert after["loads"] - before["loads"] >= 3 * len(tenants) - ADAPTER_SLOTS


def test_sixteen_concurrent_requests_from_four_tenants_are_each_right(serving, references):
    jobs = [(TENANTS[i % 4], 200 + i) for i in range(16)]

    def one(job):
        tenant, seed = job
        return job, generate_png(serving, tenant, f"{tenant}/pets", seed=seed)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    batched = 0
    for (tenant, seed), response in results:
        assert response.status_code == 200, response.text
        expected = references.image(serving.adapters[tenant], seed, PROMPT)
        assert max_abs_diff(png_pixels(response.content), expected) <= BATCHED_TOLERANCE, (tenant, seed)
        batched += int(response.headers["x-ct2i-batch-size"]) > 1
    print(f"{batched}/16 requests shared a batch")


def test_json_format_returns_every_image_with_seeds_and_timings(serving, references):
    tenant = TENANTS[2]
    with serving.client(tenant) as client:
        response = client.post("/v1/generate", json=body(f"{tenant}/pets@1", 7, n=2, format="json"))
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["seeds"] == [7, 8] and payload["seed"] == 7
    assert payload["adapter"] == {"id": serving.adapters[tenant], "tenant": tenant, "name": "pets", "version": 1}
    assert {"denoise", "decode", "total"} <= set(payload["timings"])
    for image, seed in zip(payload["images"], payload["seeds"]):
        pixels = png_pixels(base64.b64decode(image))
        assert max_abs_diff(pixels, references.image(serving.adapters[tenant], seed, PROMPT)) <= BATCHED_TOLERANCE


def test_seed_omitted_is_random_and_reported(serving, references):
    with serving.client(TENANTS[0]) as client:
        response = client.post("/v1/generate", json={k: v for k, v in body("base", 0, prompt="a cat").items() if k != "seed"})
    assert response.status_code == 200, response.text
    seed = int(response.headers["x-ct2i-seed"])
    assert max_abs_diff(png_pixels(response.content), references.image(None, seed, "a cat")) == 0


# -- auth and isolation --------------------------------------------------------------------------


def test_missing_wrong_and_revoked_keys_get_401(serving):
    plane = serving.plane
    revoked = plane.create_key("tenant", TENANTS[3])
    plane.revoke_key(revoked.id)
    for headers in ({}, {"Authorization": "Bearer ct2i_not-a-key"}, {"Authorization": f"Basic {serving.keys[TENANTS[3]]}"},
                    {"Authorization": f"Bearer {revoked.key}"}):
        response = httpx.post(f"{serving.base_url}/v1/generate", json=body("base", 0, prompt="a cat"), headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["detail"]["field"] == "authorization"
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_tenants_adapter_is_404_like_a_missing_one(serving):
    owner, other = TENANTS[0], TENANTS[1]
    answers = []
    for reference in (f"{owner}/pets", serving.adapters[owner], f"{owner}/pets@1", f"{other}/nope", "ad-0123456789abcdef"):
        response = generate_png(serving, other, reference, seed=0)
        assert response.status_code == 404, (reference, response.text)
        assert response.json()["detail"]["field"] == "adapter"
        answers.append(response.json()["detail"]["message"].replace(reference, "REF"))
    assert len(set(answers)) == 1  # the owner's adapter reads exactly like one that does not exist


def test_spoofed_multiplex_header_is_ignored(serving, references):
    victim, attacker = TENANTS[0], TENANTS[1]
    with serving.client(attacker) as client:
        for spoof in ("serve_multiplexed_model_id", "serve-multiplexed-model-id"):
            own = client.post("/v1/generate", json=body(f"{attacker}/pets", 11), headers={spoof: serving.adapters[victim]})
            assert own.status_code == 200, own.text
            assert max_abs_diff(png_pixels(own.content), references.image(serving.adapters[attacker], 11, PROMPT)) == 0
            base = client.post("/v1/generate", json=body("base", 11, prompt="a cat"), headers={spoof: serving.adapters[victim]})
            assert base.status_code == 200, base.text
            assert max_abs_diff(png_pixels(base.content), references.image(None, 11, "a cat")) == 0


def test_over_the_rate_limit_is_429_with_retry_after_and_other_tenants_are_unaffected(serving):
    statuses = []
    with serving.client(LIMITED_TENANT) as limited:
        for seed in range(LIMITED_RPM + 2):
            response = limited.post("/v1/generate", json=body("base", seed, prompt="a cat", steps=1))
            statuses.append(response.status_code)
            if response.status_code == 429:
                retry_after = int(response.headers["retry-after"])
                assert 1 <= retry_after <= 60 / LIMITED_RPM + 1
                assert response.json()["detail"]["field"] == "tenant.generate_rpm"
    assert statuses[:LIMITED_RPM] == [200] * LIMITED_RPM
    assert statuses[LIMITED_RPM:] == [429, 429]
    other = generate_png(serving, TENANTS[0], "base", seed=0, prompt="a cat", steps=1)
    assert other.status_code == 200, other.text


# -- bad input -----------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["cat"] * 80)
BAD_INPUTS = [
    # (name, raw body or dict override, expected status, expected field)
    ("unknown adapter", {"adapter": "t1/nope"}, 404, "adapter"),
    ("another tenant's adapter", {"adapter": "t2/pets"}, 404, "adapter"),
    ("steps 0", {"steps": 0}, 422, "steps"),
    ("steps 101", {"steps": 101}, 422, "steps"),
    ("guidance -1", {"guidance_scale": -1}, 422, "guidance_scale"),
    ("guidance 31", {"guidance_scale": 31}, 422, "guidance_scale"),
    ("n 0", {"n": 0, "format": "json"}, 422, "n"),
    ("n 9", {"n": 9, "format": "json"}, 422, "n"),
    ("width not a multiple of 8", {"width": 60}, 422, "width"),
    ("height not a multiple of 8", {"height": 100}, 422, "height"),
    ("width above the absolute range", {"width": 4096}, 422, "width"),
    ("width above the tiny base's range", {"width": 512}, 422, "width"),
    ("height below the tiny base's range", {"height": 24}, 422, "height"),
    ("prompt over 77 tokens", {"prompt": LONG_PROMPT}, 422, "prompt"),
    ("identifier token the adapter lacks", {"prompt": "a photo of <q9> cat"}, 422, "prompt"),
    ("identifier token on the bare base", {"adapter": "base"}, 422, "prompt"),
    ("negative prompt over 77 tokens", {"negative_prompt": LONG_PROMPT}, 422, "negative_prompt"),
    ("unknown field", {"sampler": "euler"}, 422, "sampler"),
    ("missing prompt", {"prompt": None}, 422, "prompt"),
    ("wrong type", {"steps": "many"}, 422, "steps"),
    ("png with n > 1", {"n": 2}, 422, "format"),
    ("malformed JSON", b'{"adapter": "t1/pets", "prompt": ', 400, "body"),
    ("not JSON at all", b"\xff\xfe", 400, "body"),
    ("oversized body", b'{"prompt": "' + b"a" * 200_000 + b'"}', 413, "body"),
]


@pytest.mark.parametrize("name, change, status, field", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(serving, name, change, status, field):
    with serving.client("t1") as client:
        if isinstance(change, bytes):
            response = client.post("/v1/generate", content=change, headers={"content-type": "application/json"})
        else:
            request = body("t1/pets", 0)
            request.update(change)
            request = {k: v for k, v in request.items() if v is not None}
            response = client.post("/v1/generate", json=request)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["message"]


def test_after_the_bad_inputs_the_same_replica_still_serves(serving, references):
    before = serving.generator_stats()
    response = generate_png(serving, "t1", "t1/pets", seed=3)
    assert response.status_code == 200, response.text
    assert max_abs_diff(png_pixels(response.content), references.image(serving.adapters["t1"], 3, PROMPT)) == 0
    assert serving.generator_stats()["base_fingerprint"] == before["base_fingerprint"]


# -- the registry's changes take effect at once --------------------------------------------------


def test_new_version_is_served_at_once_and_a_deleted_one_stops_at_once(serving, references):
    from tests.serve.adapters import publish, write_adapter

    tenant = TENANTS[3]
    source = write_adapter(serving.work / "v2", tenant=tenant, name="pets", seed=99)
    v2 = publish(serving.plane, tenant, "pets", source)
    serving.adapter_dirs[v2] = source
    latest = generate_png(serving, tenant, f"{tenant}/pets", seed=5)
    assert latest.status_code == 200 and latest.headers["x-ct2i-adapter"] == v2
    assert max_abs_diff(png_pixels(latest.content), references.image(v2, 5, PROMPT)) == 0
    pinned = generate_png(serving, tenant, f"{tenant}/pets@1", seed=5)
    assert pinned.headers["x-ct2i-adapter"] == serving.adapters[tenant]

    serving.plane.delete_adapter(tenant, v2)
    for reference in (v2, f"{tenant}/pets@2"):
        assert generate_png(serving, tenant, reference, seed=5).status_code == 404
    fallback = generate_png(serving, tenant, f"{tenant}/pets", seed=5)
    assert fallback.status_code == 200 and fallback.headers["x-ct2i-adapter"] == serving.adapters[tenant]


def test_adapter_tuned_on_another_base_is_refused_before_use(serving):
    from tests.serve.adapters import publish, write_adapter

    tenant = TENANTS[2]
    source = write_adapter(serving.work / "foreign", tenant=tenant, name="foreign", seed=5, base_fingerprint="0" * 64)
    publish(serving.plane, tenant, "foreign", source)
    response = generate_png(serving, tenant, f"{tenant}/foreign", seed=0)
    assert response.status_code == 409, response.text
    assert response.json()["detail"]["field"] == "adapter"
    assert "different base" in response.json()["detail"]["message"]


# -- the rest of the surface ---------------------------------------------------------------------


def test_control_plane_api_docs_and_health_share_the_port(serving):
    tenant = TENANTS[0]
    with serving.client(tenant) as client:
        adapters = client.get("/v1/adapters")
        assert adapters.status_code == 200
        assert {a["id"] for a in adapters.json()} == {serving.adapters[tenant]}
        assert client.get("/v1/tunings").status_code == 200
        models = client.get("/v1/models").json()["data"]
        assert {m["id"] for m in models} == {"base", f"{tenant}/pets@1"}
    assert httpx.get(f"{serving.base_url}/v1/adapters").status_code == 401
    health = httpx.get(f"{serving.base_url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    spec = httpx.get(f"{serving.base_url}/openapi.json").json()
    assert {"/v1/generate", "/v1/images/generations", "/v1/tunings", "/v1/adapters", "/healthz"} <= set(spec["paths"])
    assert "swagger" in httpx.get(f"{serving.base_url}/docs").text.lower()


def test_generator_reports_cache_and_batch_metrics(serving):
    stats = serving.generator_stats()
    totals = stats["totals"]
    assert totals["cache_misses"] == stats["misses"] and totals["cache_loads"] == stats["loads"]
    assert totals["cache_evictions"] == stats["evictions"] and totals["cache_hits"] == stats["hits"]
    assert sum(stats["batch_sizes"].values()) > 0


def test_openai_client_generates_an_image(serving, references):
    import openai

    client = openai.OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.keys[TENANTS[1]], max_retries=0)
    result = client.images.generate(model=f"{TENANTS[1]}/pets", prompt=PROMPT, n=1, size=f"{SIDE}x{SIDE}",
                                    response_format="b64_json", extra_body={"steps": STEPS, "guidance_scale": 5.0, "seed": 21})
    assert len(result.data) == 1
    pixels = png_pixels(base64.b64decode(result.data[0].b64_json))
    assert max_abs_diff(pixels, references.image(serving.adapters[TENANTS[1]], 21, PROMPT)) == 0
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model=f"{TENANTS[0]}/pets", prompt=PROMPT, size=f"{SIDE}x{SIDE}", response_format="b64_json")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(model="base", prompt="a cat", size="100x64", response_format="b64_json")
    assert refused.value.status_code == 422 and refused.value.body["param"] == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serving.base_url}/v1", api_key="ct2i_wrong", max_retries=0).images.generate(
            model="base", prompt="a cat", response_format="b64_json")


def test_client_that_disconnects_is_cancelled_and_the_replica_keeps_serving(serving):
    slow = body("base", 0, prompt="a cat", steps=100, width=256, height=256)
    with serving.client(TENANTS[2], timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json=slow)
    deadline = time.time() + 60
    while time.time() < deadline and not serving.generator_stats()["totals"].get("abandoned_cancelled"):
        time.sleep(0.5)
    assert serving.generator_stats()["totals"].get("abandoned_cancelled", 0) >= 1
    assert generate_png(serving, TENANTS[2], "base", seed=0, prompt="a cat", steps=1).status_code == 200
