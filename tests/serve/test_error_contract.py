"""Issue 13, items 7, 8 and 10 over the ingress's whole surface (the generate routes and the control plane it
includes), in process with a fake generator:

- strict schemas: each lax value the hostile-tenant probe got accepted is a 422 naming its field;
- one error contract: every error body is `{"detail": {"field", "message", "code"}}`, 65 images is the 413 the
  docs and the OpenAPI document give, every status is documented, every `$ref` resolves;
- no internals: listings carry ids, not storage paths; server faults are 5xx with a correlation id that the
  server logged with the traceback; `/healthz` says healthy or not; every response sends the security headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cluster.config import ControlPlaneSettings
from cluster.db import Job
from cluster.http import ERROR_CODES, ErrorBody
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from serve.ingress import WEB_DIR, LocalRateLimiter, create_ingress_app
from serve.schemas import GeneratedImages
from tests.cluster.conftest import png_bytes, spec_dict
from tests.serve.adapters import publish, write_adapter


class FakeGenerator:
    def __init__(self):
        self.fail_with: Exception | None = None

    async def __call__(self, model_id, call):
        if self.fail_with is not None:
            raise self.fail_with
        return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                               batch_size=1, timings={"denoise": 0.1})


@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    work = tmp_path_factory.mktemp("contract")
    plane = ControlPlane.open(ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                                   artifacts_uri=str(work / "artifacts"), capacity_gpus=4))
    plane.on_change = lambda _job: None
    plane.create_tenant("acme", Quotas(generate_rpm=1_000_000))
    plane.create_tenant("slow", Quotas(generate_rpm=1))
    adapter_id = publish(plane, "acme", "pets", write_adapter(work / "pets", tenant="acme", name="pets", seed=1))
    generator = FakeGenerator()
    app = create_ingress_app(plane, generator, limiter=LocalRateLimiter())
    keys = {"admin": plane.create_key("admin").key, "acme": plane.create_key("tenant", "acme").key,
            "slow": plane.create_key("tenant", "slow").key}
    client = TestClient(app, raise_server_exceptions=False)
    return plane, client, keys, adapter_id, generator, work


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def tuning(**train) -> dict:
    return {"spec": spec_dict("acme", **train), "images": {"a.png": base64.b64encode(png_bytes()).decode()}}


def raw(document: dict, replace: dict[str, str]) -> str:
    """`document` as JSON text with placeholder strings replaced by raw JSON (Infinity, 1e400, a repeated key)."""
    text = json.dumps(document)
    for placeholder, value in replace.items():
        text = text.replace(json.dumps(placeholder), value)
    return text


GENERATE = {"adapter": "base", "prompt": "a cat"}
IMAGES = {"model": "base", "prompt": "a cat"}
YAML_SPEC = """tenant: acme
name: pets
base_model: tiny
subjects: [{token: "<s1>", class_word: cat, images: [a.png]}]
train: {resolution: 64, %s}
resources: {num_workers: 1, gpus_per_worker: 1, cpus_per_worker: 1}
"""

# (route, key, JSON body or raw text, the field the 422 must name, its code or None for the default)
BAD_VALUES = [
    ("/v1/generate", "acme", {**GENERATE, "seed": 10**30}, "seed", None),
    ("/v1/generate", "acme", {**GENERATE, "seed": 2**64}, "seed", None),
    ("/v1/generate", "acme", {**GENERATE, "seed": -1}, "seed", None),
    ("/v1/generate", "acme", {**GENERATE, "steps": True}, "steps", None),
    ("/v1/generate", "acme", {**GENERATE, "steps": "30"}, "steps", None),
    ("/v1/generate", "acme", {**GENERATE, "n": True}, "n", None),
    ("/v1/generate", "acme", {**GENERATE, "width": "64"}, "width", None),
    ("/v1/generate", "acme", raw({**GENERATE, "guidance_scale": "@"}, {"@": "Infinity"}), "guidance_scale", "non_finite_number"),
    ("/v1/generate", "acme", raw({**GENERATE, "guidance_scale": "@"}, {"@": "NaN"}), "guidance_scale", "non_finite_number"),
    ("/v1/generate", "acme", raw({**GENERATE, "guidance_scale": "@"}, {"@": "1e400"}), "guidance_scale", "non_finite_number"),
    ("/v1/generate", "acme", '{"adapter": "base", "prompt": "a cat", "prompt": "a dog"}', "prompt", "duplicate_key"),
    ("/v1/images/generations", "acme", {**IMAGES, "size": "٦٤x٦٤"}, "size", None),  # Arabic-Indic digits
    ("/v1/images/generations", "acme", {**IMAGES, "size": "６４x６４"}, "size", None),  # full-width digits
    ("/v1/images/generations", "acme", {**IMAGES, "n": True}, "n", None),
    ("/v1/tunings", "acme", tuning(seed=10**30), "spec.train.seed", None),
    ("/v1/tunings", "acme", tuning(checkpoint_every=10**30), "spec.train.checkpoint_every", None),
    ("/v1/tunings", "acme", tuning(log_every=10**30), "spec.train.log_every", None),
    ("/v1/tunings", "acme", tuning(steps=2**62), "spec.train.steps", None),
    ("/v1/tunings", "acme", tuning(steps=True), "spec.train.steps", None),
    ("/v1/tunings", "acme", tuning(lr="0.1"), "spec.train.lr", None),
    ("/v1/tunings", "acme", raw(tuning(alpha="@"), {"@": "Infinity"}), "spec.train.alpha", "non_finite_number"),
    ("/v1/tunings", "acme", raw(tuning(lr="@"), {"@": "-Infinity"}), "spec.train.lr", "non_finite_number"),
    ("/v1/tunings", "acme", raw(tuning(steps="@"), {"@": '4, "steps": 5'}), "spec.train.steps", "duplicate_key"),
    ("/v1/admin/tenants", "admin", raw({"name": "zed", "weight": "@"}, {"@": "Infinity"}), "weight", "non_finite_number"),
    ("/v1/admin/tenants", "admin", {"name": "zed", "max_adapters": True}, "max_adapters", None),
    ("/v1/admin/tenants", "admin", {"name": "zed", "max_stored_bytes": 2**63}, "max_stored_bytes", None),
    ("/v1/admin/tenants", "admin", '{"name": "zed", "name": "zed2"}', "name", "duplicate_key"),
]


@pytest.mark.parametrize("route, key, body, field, code", BAD_VALUES, ids=[f"{r[3]}-{i}" for i, r in enumerate(BAD_VALUES)])
def test_each_lax_value_is_a_422_naming_its_field(surface, route, key, body, field, code):
    plane, client, keys, *_ = surface
    jobs_before = _jobs(plane)
    if isinstance(body, str):
        response = client.post(route, content=body, headers={**auth(keys[key]), "Content-Type": "application/json"})
    else:
        response = client.post(route, json=body, headers=auth(keys[key]))
    assert response.status_code == 422, response.text
    detail = ErrorBody.model_validate(response.json()).detail
    assert detail.field == field, response.text
    assert detail.code == (code or "invalid_field")
    assert _jobs(plane) == jobs_before and "zed" not in {t.name for t in plane.list_tenants()}


@pytest.mark.parametrize("train, field, code", [
    ("alpha: .inf", "spec.train.alpha", "non_finite_number"), ("lr: .nan", "spec.train.lr", "non_finite_number"), ("steps: true", "spec.train.steps", None),
    ("steps: '4'", "spec.train.steps", None), ("seed: 1000000000000000000000000000000", "spec.train.seed", None),
    ("checkpoint_every: 1000000000000000000000000000000", "spec.train.checkpoint_every", None),
    ("steps: 4, steps: 5", "spec.train.steps", "duplicate_key"),
])
def test_a_yaml_spec_in_a_multipart_upload_is_as_strict(surface, train, field, code):
    plane, client, keys, *_ = surface
    response = client.post("/v1/tunings", data={"spec": YAML_SPEC % train},
                           files=[("files", ("a.png", png_bytes(), "image/png"))], headers=auth(keys["acme"]))
    assert response.status_code == 422 and response.json()["detail"]["field"] == field, response.text
    assert response.json()["detail"]["code"] == (code or "invalid_field")
    ok = client.post("/v1/tunings", data={"spec": YAML_SPEC % "steps: 4"}, files=[("files", ("a.png", png_bytes(), "image/png"))],
                     headers=auth(keys["acme"]))
    assert ok.status_code == 201, ok.text


def test_the_strict_schema_still_takes_what_clients_send(surface):
    """The strictness refuses conversions, not values: integers for floats, a seed at 2**64-1, `auto`."""
    plane, client, keys, *_ = surface
    ok = client.post("/v1/generate", json={**GENERATE, "guidance_scale": 5, "seed": 2**64 - 1, "format": "json"},
                     headers=auth(keys["acme"]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["seeds"] == [2**64 - 1]
    sized = client.post("/v1/images/generations", json={**IMAGES, "size": "64x64"}, headers=auth(keys["acme"]))
    assert sized.status_code == 200, sized.text
    submitted = client.post("/v1/tunings", json=tuning(alpha="auto", lr=1, seed=2**63), headers=auth(keys["acme"]))
    assert submitted.status_code == 201, submitted.text


def _jobs(plane) -> int:
    with plane.db.read() as session:
        return session.execute(select(func.count()).select_from(Job)).scalar_one()


# -- one error contract ------------------------------------------------------------------------------------------


def test_every_error_has_one_shape_with_a_code(surface):
    plane, client, keys, adapter_id, *_ = surface
    too_many = {f"i{n}.png": base64.b64encode(png_bytes(8)).decode() for n in range(65)}
    files = [("files", (f"i{n}.png", png_bytes(8), "image/png")) for n in range(65)]
    client.post("/v1/generate", json=GENERATE, headers=auth(keys["slow"]))  # the one request a minute
    cases = {
        "malformed JSON": (client.post("/v1/generate", content=b"{", headers={**auth(keys["acme"]), "Content-Type": "application/json"}),
                           400, "body", "malformed_json"),
        "no key": (client.get("/v1/adapters"), 401, "authorization", "unauthenticated"),
        "tenant key on an admin route": (client.get("/v1/admin/tenants", headers=auth(keys["acme"])), 403, "authorization", "forbidden"),
        "unknown job": (client.get("/v1/tunings/job-nope", headers=auth(keys["acme"])), 404, "id", "not_found"),
        "unknown route": (client.get("/v1/nothing-here", headers=auth(keys["acme"])), 404, "request", "not_found"),
        "existing tenant": (client.post("/v1/admin/tenants", json={"name": "acme"}, headers=auth(keys["admin"])), 409, "name", "conflict"),
        "body over the generate limit": (client.post("/v1/generate", json={**GENERATE, "prompt": "x" * 70_000}, headers=auth(keys["acme"])),
                                         413, "body", "too_large"),
        "65 images as JSON": (client.post("/v1/tunings", json={"spec": spec_dict("acme"), "images": too_many}, headers=auth(keys["acme"])),
                              413, "images", "too_many_images"),
        "65 images as multipart": (client.post("/v1/tunings", data={"spec": json.dumps(spec_dict("acme"))}, files=files,
                                               headers=auth(keys["acme"])), 413, "images", "too_many_images"),
        "a bad field": (client.post("/v1/generate", json={**GENERATE, "steps": 0}, headers=auth(keys["acme"])), 422, "steps", "invalid_field"),
        "a bad query": (client.get("/v1/tunings?limit=0", headers=auth(keys["acme"])), 422, "limit", "invalid_field"),
        "over the generate rate": (client.post("/v1/generate", json=GENERATE, headers=auth(keys["slow"])), 429, "tenant.generate_rpm", "over_limit"),
    }
    for name, (response, status, field, code) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"detail"}, (name, body)  # the OpenAI routes add `error`; these are not OpenAI routes
        assert set(body["detail"]) == {"field", "message", "code"}, (name, body)
        detail = ErrorBody.model_validate(body).detail
        assert (detail.field, detail.code) == (field, code), (name, body)
        assert detail.message
    assert ERROR_CODES[413] == "too_large" and ERROR_CODES[429] == "over_limit"
    assert "Retry-After" in cases["over the generate rate"][0].headers


def test_openai_routes_carry_both_shapes(surface):
    _, client, keys, *_ = surface
    response = client.post("/v1/images/generations", json={**IMAGES, "n": 0}, headers=auth(keys["acme"]))
    body = response.json()
    assert response.status_code == 422 and body["detail"]["code"] == "invalid_field" and body["error"]["param"] == "n"
    ErrorBody.model_validate(body)


def test_the_document_lists_every_status_with_the_error_schema_and_every_ref_resolves(surface):
    _, client, *_ = surface
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    assert refs and all(ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas for ref in refs), \
        sorted(r for r in refs if r.rsplit("/", 1)[1] not in schemas)
    assert "$defs" not in json.dumps(document["paths"])
    assert set(schemas["ErrorDetail"]["required"]) == {"field", "message", "code"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1/"):
                expected = {"400", "401", "403", "404", "409", "413", "422", "429", "500"}
                assert expected <= set(responses), (method, path, sorted(responses))
                for status in expected:
                    schema = responses[status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    for path in ("/v1/generate", "/v1/images/generations"):
        assert {"503", "504"} <= set(document["paths"][path]["post"]["responses"])
    assert "413" in document["paths"]["/v1/tunings"]["post"]["responses"]
    assert "too many images" in document["paths"]["/v1/tunings"]["post"]["responses"]["413"]["description"]


# -- no internals in responses -------------------------------------------------------------------------------------


def test_adapter_responses_carry_ids_not_storage_paths(surface):
    plane, client, keys, adapter_id, _, work = surface
    assert plane.get_adapter(None, adapter_id).uri  # the platform still knows where it is
    for response in (client.get("/v1/adapters", headers=auth(keys["acme"])),
                     client.get(f"/v1/adapters/{adapter_id}", headers=auth(keys["acme"])),
                     client.get("/v1/adapters", headers=auth(keys["admin"]))):
        assert response.status_code == 200, response.text
        views = response.json() if isinstance(response.json(), list) else [response.json()]
        assert views and all("uri" not in view and view["id"].startswith("ad-") for view in views)
        assert str(work) not in response.text and "artifacts" not in response.text and "tenants/" not in response.text
    document = client.get("/openapi.json").json()
    assert "uri" not in document["components"]["schemas"]["AdapterView"]["properties"]


def _assert_opaque_fault(response, caplog, status: int, *secrets: str) -> str:
    assert response.status_code == status, response.text
    detail = ErrorBody.model_validate(response.json()).detail
    assert detail.correlation_id and re.fullmatch(r"[0-9a-f]{16}", detail.correlation_id)
    assert response.headers["X-Correlation-ID"] == detail.correlation_id
    assert detail.correlation_id in detail.message
    for secret in secrets:
        assert secret not in response.text
    assert "Traceback" not in response.text and "Error" not in response.text
    logged = [r for r in caplog.records if detail.correlation_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "the fault is logged server-side, with its traceback"
    return detail.correlation_id


def test_a_corrupt_download_is_an_opaque_server_fault(tmp_path, caplog):
    settings = ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                    artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    plane.create_tenant("acme")
    adapter_id = publish(plane, "acme", "pets", write_adapter(tmp_path / "pets", tenant="acme", name="pets", seed=1))
    client = TestClient(create_ingress_app(plane, FakeGenerator()), raise_server_exceptions=False)
    key = plane.create_key("tenant", "acme").key
    assert client.get(f"/v1/adapters/{adapter_id}/files/manifest.json", headers=auth(key)).status_code == 200
    view = plane.get_adapter(None, adapter_id)
    manifest = Path(plane.store.path("acme", *plane.store.parse_uri(view.uri, "acme"))) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"<s1>"', '"<s2>"', 1))
    with caplog.at_level(logging.ERROR, logger="ct2i.http"):
        response = client.get(f"/v1/adapters/{adapter_id}/files/manifest.json", headers=auth(key))
        _assert_opaque_fault(response, caplog, 500, str(tmp_path), "artifacts", "sha256 mismatch")
    assert response.json()["detail"]["code"] == "artifact_corrupt"
    assert any(str(tmp_path) in r.getMessage() for r in caplog.records), "the operators' log names the file"


def test_an_unexpected_exception_is_a_500_with_only_a_correlation_id(surface, caplog, monkeypatch):
    plane, client, keys, *_ = surface

    def broken(*args, **kwargs):
        raise RuntimeError("/srv/ct2i/secret/path.db is locked")

    monkeypatch.setattr(plane, "list_tenants", broken)
    with caplog.at_level(logging.ERROR, logger="ct2i.http"):
        response = client.get("/v1/admin/tenants", headers=auth(keys["admin"]))
        _assert_opaque_fault(response, caplog, 500, "/srv/ct2i", "RuntimeError", "locked")
    assert response.json()["detail"]["code"] == "internal_error"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_generator_that_fails_is_a_503_without_its_exception_text(surface, caplog):
    _, client, keys, _, generator, _ = surface
    generator.fail_with = ConnectionError("replica at 10.1.2.3:8000 died reading /models/ad-1")
    try:
        with caplog.at_level(logging.ERROR, logger="ct2i.http"):
            response = client.post("/v1/generate", json=GENERATE, headers=auth(keys["acme"]))
            _assert_opaque_fault(response, caplog, 503, "10.1.2.3", "/models", "ConnectionError")
        assert response.headers["Retry-After"] == "5" and response.json()["detail"]["code"] == "unavailable"
    finally:
        generator.fail_with = None


def test_healthz_says_only_healthy_or_not(surface, monkeypatch):
    plane, client, keys, *_ = surface
    client.post("/v1/generate", json=GENERATE, headers=auth(keys["acme"]))  # traffic it must not report
    healthy = client.get("/healthz")
    assert healthy.status_code == 200 and healthy.json() == {"status": "ok"}

    def down(*args, **kwargs):
        raise OSError("could not connect to server at /var/run/postgresql")

    monkeypatch.setattr(plane, "list_tenants", down)
    unhealthy = client.get("/healthz")
    assert unhealthy.status_code == 503 and unhealthy.json() == {"status": "unhealthy"}


def _csp(response) -> dict[str, list[str]]:
    policy = response.headers["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}


def test_the_page_and_every_response_send_the_security_headers(surface):
    _, client, keys, *_ = surface
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = _csp(page)
    assert policy["script-src"] == ["'self'"], "no inline script, no eval: the page's script is /web/app.js"
    assert "'unsafe-inline'" not in policy["style-src"] and "'unsafe-eval'" not in page.headers["Content-Security-Policy"]
    styles = re.findall(rb"<style>(.*?)</style>", (WEB_DIR / "index.html").read_bytes(), re.S)
    # The console keeps its CSS in /web/style.css; an inline block, if one comes back, is allowed by its hash only.
    allowed = ["'self'"] + [f"'sha256-{base64.b64encode(hashlib.sha256(style).digest()).decode()}'" for style in styles]
    assert policy["style-src"] == allowed
    assert not re.search(rb"\sstyle=", page.content), "no style= attributes: the policy allows none"
    assert policy["frame-ancestors"] == ["'none'"] and policy["default-src"] == ["'none'"]
    assert not re.search(rb"<script(?![^>]*\ssrc=)[^>]*>", page.content), "every script of the page is a file"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "'unsafe-inline'" not in _csp(docs)["script-src"]
    responses = [page, docs, client.get("/web/app.js"), client.get("/healthz"), client.get("/openapi.json"),
                 client.get("/v1/adapters"), client.get("/v1/models", headers=auth(keys["acme"])),
                 client.post("/v1/generate", json=GENERATE, headers=auth(keys["acme"]))]
    for response in responses:
        assert response.headers["X-Frame-Options"] == "DENY", response.url
        assert response.headers["Referrer-Policy"] == "no-referrer", response.url
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.url
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], response.url
