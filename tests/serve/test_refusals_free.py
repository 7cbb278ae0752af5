"""The ingress in front of a real generator engine (tiny base, no Ray): what the generator refuses costs the tenant
no rate-limit token, and an adapter whose stored files no longer match the registry is refused without a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from causalt2i.models import load_sdxl
from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from serve.generator import GeneratorEngine, local_adapter_locator, refusal_for
from serve.ingress import LocalRateLimiter, TokenBuckets, create_ingress_app
from serve.schemas import BASE_MODEL_REF, GeneratedImages
from tests.serve.adapters import publish, write_adapter

RPM = 3


class FrozenClock:
    """The buckets' clock stands still, so no token refills while the test runs."""

    def __call__(self) -> float:
        return 1000.0


@pytest.fixture(scope="module")
def parts():
    return load_sdxl("tiny")


@pytest.fixture
def setup(tmp_path, parts):
    settings = ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                    artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    plane.create_tenant("acme", Quotas(generate_rpm=RPM))
    adapter_id = publish(plane, "acme", "pets", write_adapter(tmp_path / "pets", tenant="acme", name="pets", seed=1))
    engine = GeneratorEngine(parts, cache_bytes=10**8, locate=local_adapter_locator(plane))

    async def generate(model_id: str, call):
        """The replica's path up to the denoiser: load (verified) and check; a refusal as the replica returns it."""
        try:
            adapter = engine.adapter(None if model_id == BASE_MODEL_REF else model_id)
            engine.check(call.request, adapter.manifest.tokens if adapter is not None else [])
        except Exception as err:
            return refusal_for(err)
        return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                               batch_size=1)

    buckets = TokenBuckets(FrozenClock())
    client = TestClient(create_ingress_app(plane, generate, limiter=LocalRateLimiter(buckets)))
    headers = {"Authorization": f"Bearer {plane.create_key('tenant', 'acme').key}"}
    return plane, client, headers, buckets, adapter_id


def test_generator_refusals_leave_the_tenants_tokens_untouched(setup):
    plane, client, headers, buckets, _ = setup
    refused = [
        ({"adapter": "base", "prompt": "a cat", "width": 512, "height": 512}, "width"),  # beyond tiny's range
        ({"adapter": "pets", "prompt": "a <zz9> cat"}, "prompt"),  # an identifier token the adapter does not have
        ({"adapter": "base", "prompt": "a <s1> cat"}, "prompt"),  # the bare base has no identifier tokens at all
    ]
    for _ in range(2):  # more refusals than the bucket holds: none of them may cost a token
        for body, field in refused:
            response = client.post("/v1/generate", json=body, headers=headers)
            assert response.status_code == 422, response.text
            assert response.json()["detail"]["field"] == field
            assert buckets.remaining("acme", RPM) == RPM
    for _ in range(RPM):  # the whole budget is still there
        assert client.post("/v1/generate", json={"adapter": "pets", "prompt": "a <s1> cat"}, headers=headers).status_code == 200
    assert buckets.remaining("acme", RPM) == 0
    assert client.post("/v1/generate", json={"adapter": "base", "prompt": "x"}, headers=headers).status_code == 429


def test_an_adapter_whose_manifest_changed_by_one_byte_is_refused_without_a_path(setup, tmp_path):
    plane, client, headers, buckets, adapter_id = setup
    view = plane.get_adapter(None, adapter_id)
    folder = Path(plane.store.path("acme", *plane.store.parse_uri(view.uri, "acme")))
    manifest = folder / "manifest.json"
    text = manifest.read_text()
    assert '"<s1>"' in text
    manifest.write_text(text.replace('"<s1>"', '"<s2>"', 1))  # one byte: the token the adapter answers to
    # The download route refuses the same file...
    with pytest.raises(Exception) as download:
        plane.adapter_file("acme", adapter_id, "manifest.json")
    assert "sha256" in str(download.value)
    # ...and so does serving, before any load, whatever the request's token.
    for prompt in ("a <s2> cat", "a <s1> cat"):
        response = client.post("/v1/generate", json={"adapter": "pets", "prompt": prompt}, headers=headers)
        assert response.status_code == 409, response.text
        body = response.text
        assert response.json()["detail"]["field"] == "adapter"
        assert str(tmp_path) not in body and "/artifacts" not in body and "tenants/" not in body
    assert buckets.remaining("acme", RPM) == RPM  # refused before any image: free as well


def test_weights_that_differ_from_the_registrys_digest_are_refused(setup):
    """The artifact's own sha256 table rewritten to match altered weights still disagrees with the registry."""
    plane, client, headers, _, adapter_id = setup
    import hashlib

    view = plane.get_adapter(None, adapter_id)
    folder = Path(plane.store.path("acme", *plane.store.parse_uri(view.uri, "acme")))
    weights = folder / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    table_path = folder / "_manifest.json"
    table = json.loads(table_path.read_text())
    table["files"]["adapter.safetensors"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    table_path.write_text(json.dumps(table))
    response = client.post("/v1/generate", json={"adapter": "pets", "prompt": "a <s1> cat"}, headers=headers)
    assert response.status_code == 409 and adapter_id in response.json()["detail"]["message"]
    assert str(folder) not in response.text
