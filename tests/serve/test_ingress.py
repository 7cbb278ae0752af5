"""The ingress app without Ray: a fake generator behind it, a real control plane (SQLite) in front."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane, NotFound
from serve.ingress import LocalRateLimiter, TokenBuckets, create_ingress_app, resolve_adapter
from serve.schemas import GeneratedImages, Refusal
from tests.serve.adapters import publish, write_adapter


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_refills_at_the_rate():
    clock = FakeClock()
    buckets = TokenBuckets(clock)
    assert [buckets.take("a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 3) == pytest.approx(20.0)  # 3 per minute: one token every 20 s
    assert buckets.take("b", 3) == 0.0  # another tenant has its own bucket
    clock.now += 10
    assert buckets.take("a", 3) == pytest.approx(10.0)
    clock.now += 10
    assert buckets.take("a", 3) == 0.0
    assert buckets.take("c", 0) == 60.0  # a tenant with generate_rpm 0 may not generate


@pytest.fixture
def plane(tmp_path) -> ControlPlane:
    settings = ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                    artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    for tenant in ("acme", "other"):
        plane.create_tenant(tenant, Quotas(generate_rpm=2 if tenant == "acme" else 100))
    return plane


@pytest.fixture
def published(plane, tmp_path) -> dict[str, str]:
    ids = {}
    for version in (1, 2):
        ids[f"acme/pets@{version}"] = publish(plane, "acme", "pets",
                                              write_adapter(tmp_path / f"v{version}", tenant="acme", name="pets", seed=version))
    ids["other/toys@1"] = publish(plane, "other", "toys", write_adapter(tmp_path / "o", tenant="other", name="toys", seed=9))
    return ids


@pytest.mark.parametrize("reference, expected", [
    ("acme/pets", "acme/pets@2"), ("pets", "acme/pets@2"), ("acme/pets@1", "acme/pets@1"), ("pets@2", "acme/pets@2")])
def test_references_resolve_to_the_registry_version(plane, published, reference, expected):
    assert resolve_adapter(plane, "acme", reference).id == published[expected]


def test_base_and_adapter_ids_resolve(plane, published):
    assert resolve_adapter(plane, "acme", "base") is None
    assert resolve_adapter(plane, "acme", published["acme/pets@1"]).version == 1


@pytest.mark.parametrize("reference", ["other/toys", "toys", "acme/pets@3", "acme/cats", "ad-ffffffffffffffff", "OTHER"])
def test_unknown_or_foreign_references_are_not_found(plane, published, reference):
    with pytest.raises(NotFound) as raised:
        resolve_adapter(plane, "acme", reference)
    assert raised.value.field == "adapter"


def test_foreign_adapter_id_is_not_found(plane, published):
    with pytest.raises(NotFound):
        resolve_adapter(plane, "acme", published["other/toys@1"])


def test_malformed_reference_is_a_400_naming_the_field(plane):
    from cluster.service import ServiceError

    with pytest.raises(ServiceError) as raised:
        resolve_adapter(plane, "acme", "../../etc/passwd")
    assert raised.value.field == "adapter" and raised.value.status == 400


class FakeGenerator:
    def __init__(self, outcome=None):
        self.calls = []
        self.outcome = outcome

    async def __call__(self, model_id, call):
        self.calls.append((model_id, call))
        if self.outcome is not None:
            return self.outcome
        return GeneratedImages(pngs=[b"png%d" % i for i in range(call.request.n)], seeds=call.request.image_seeds(),
                               width=64, height=64, batch_size=1, timings={"denoise": 0.5})


def make_client(plane, generator) -> TestClient:
    return TestClient(create_ingress_app(plane, generator, limiter=LocalRateLimiter()))


def test_generate_routes_by_registry_id_and_charges_only_valid_requests(plane, published):
    key = plane.create_key("tenant", "acme").key
    generator = FakeGenerator()
    client = make_client(plane, generator)
    auth = {"Authorization": f"Bearer {key}", "serve_multiplexed_model_id": published["other/toys@1"]}
    for _ in range(3):  # invalid: refused before the rate limit is charged
        assert client.post("/v1/generate", json={"adapter": "pets", "prompt": "x", "steps": 0}, headers=auth).status_code == 422
    for _ in range(3):  # unknown adapter: the token the concurrent rate check took is given back
        assert client.post("/v1/generate", json={"adapter": "nope", "prompt": "x"}, headers=auth).status_code == 404
    ok = client.post("/v1/generate", json={"adapter": "pets", "prompt": "a <s1>", "seed": 4}, headers=auth)
    assert ok.status_code == 200 and ok.content == b"png0" and ok.headers["x-ct2i-seed"] == "4"
    assert ok.headers["x-ct2i-time-denoise"] == "0.5000"
    assert generator.calls[0][0] == published["acme/pets@2"]
    assert generator.calls[0][1].tenant == "acme"
    assert client.post("/v1/generate", json={"adapter": "base", "prompt": "x"}, headers=auth).status_code == 200
    limited = client.post("/v1/generate", json={"adapter": "base", "prompt": "x"}, headers=auth)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


def test_generator_refusals_become_http_errors_naming_the_field(plane):
    key = plane.create_key("tenant", "other").key
    client = make_client(plane, FakeGenerator(Refusal(422, "width", "must be within 32..256")))
    response = client.post("/v1/generate", json={"adapter": "base", "prompt": "x", "width": 512},
                           headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 422 and response.json()["detail"] == {"field": "width", "message": "must be within 32..256", "code": "invalid_field"}
    images = client.post("/v1/images/generations", json={"model": "base", "prompt": "x", "size": "512x512"},
                         headers={"Authorization": f"Bearer {key}"})
    assert images.status_code == 422 and images.json()["error"]["param"] == "width"


def test_admin_key_cannot_generate(plane):
    key = plane.create_key("admin").key
    response = make_client(plane, FakeGenerator()).post("/v1/generate", json={"adapter": "base", "prompt": "x"},
                                                        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403


def test_images_route_speaks_openai(plane):
    key = plane.create_key("tenant", "other").key
    generator = FakeGenerator()
    response = make_client(plane, generator).post(
        "/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
        json={"model": "base", "prompt": "x", "n": 2, "size": "64x128", "response_format": "b64_json", "steps": 3, "seed": 1})
    assert response.status_code == 200, response.text
    assert [d["b64_json"] for d in response.json()["data"]] == ["cG5nMA==", "cG5nMQ=="]
    request = generator.calls[0][1].request
    assert (request.width, request.height, request.steps, request.seeds, request.seed) == (64, 128, 3, None, 1)
    url = make_client(plane, generator).post("/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
                                             json={"model": "base", "prompt": "x", "response_format": "url"})
    assert url.status_code == 422 and url.json()["error"]["param"] == "response_format"
