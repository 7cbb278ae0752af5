"""The REST API: auth, tenant isolation (404 for another tenant's objects), bad input (4xx naming the field,
nothing stored), submission in both encodings, SSE, and admin routes."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cluster.api import create_app
from cluster.db import Job
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from tests.cluster.conftest import png_bytes, spec_dict, with_timing
from tests.cluster.fake_trainer import FakeTrainer


@pytest.fixture
def keys(plane):
    plane.create_tenant("alice")
    plane.create_tenant("bob")
    return {
        "admin": plane.create_key("admin").key,
        "alice": plane.create_key("tenant", "alice").key,
        "bob": plane.create_key("tenant", "bob").key,
    }


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def submit_json(client, key, tenant, images=None, **overrides):
    spec = spec_dict(tenant)
    spec.update(overrides)
    images = {"a.png": base64.b64encode(png_bytes()).decode()} if images is None else images
    return client.post("/v1/tunings", json={"spec": spec, "images": images}, headers=auth(key))


def finish_all(plane):
    scheduler = Scheduler(with_timing(plane.settings, heartbeat_seconds=0.2, progress_write_seconds=0.0),
                          InlineRunner(FakeTrainer()), capacity_gpus=4)
    deadline = time.time() + 20
    while time.time() < deadline:
        scheduler.tick()
        if all(j.state in ("succeeded", "failed", "cancelled") for j in plane.list_jobs(None)):
            return
        time.sleep(0.05)
    raise AssertionError("jobs did not finish")


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer ct2i_wrong", "Basic abc", "Bearer not-a-key"])
def test_missing_or_wrong_key_gets_401(client, keys, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [("get", "/v1/tunings"), ("get", "/v1/adapters"), ("get", "/v1/tunings/job-x"),
                         ("post", "/v1/tunings"), ("get", "/v1/admin/tenants")]:
        response = client.request(method.upper(), path, headers=headers)
        assert response.status_code == 401, (method, path, response.text)


def test_revoked_key_gets_401(client, keys, plane):
    assert client.get("/v1/tunings", headers=auth(keys["alice"])).status_code == 200
    key_id = next(k.id for k in plane.list_keys("alice"))
    response = client.delete(f"/v1/admin/keys/{key_id}", headers=auth(keys["admin"]))
    assert response.status_code == 200 and response.json()["revoked_at"] is not None
    assert client.get("/v1/tunings", headers=auth(keys["alice"])).status_code == 401


def test_only_hashes_of_keys_are_stored(plane, keys):
    from cluster.db import ApiKey

    with plane.db.read() as session:
        stored = [row.key_hash for row in session.execute(select(ApiKey)).scalars()]
    assert len(stored) == 3 and not set(stored) & set(keys.values())
    assert not any(key in h for key in keys.values() for h in stored)


def test_tenant_key_cannot_use_admin_routes(client, keys):
    assert client.get("/v1/admin/tenants", headers=auth(keys["alice"])).status_code == 403
    assert client.post("/v1/admin/keys", json={"scope": "admin"}, headers=auth(keys["alice"])).status_code == 403


def test_tenant_a_cannot_reach_tenant_b_objects(client, keys, plane):
    job = submit_json(client, keys["bob"], "bob")
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    finish_all(plane)
    adapter_id = plane.get_job("bob", job_id).adapter_id
    assert adapter_id
    alice = auth(keys["alice"])
    assert client.get("/v1/tunings", headers=alice).json() == []
    assert client.get("/v1/adapters", headers=alice).json() == []
    for method, path in [
        ("GET", f"/v1/tunings/{job_id}"), ("POST", f"/v1/tunings/{job_id}/cancel"), ("DELETE", f"/v1/tunings/{job_id}"),
        ("GET", f"/v1/tunings/{job_id}/events"),
        ("GET", f"/v1/adapters/{adapter_id}"), ("GET", f"/v1/adapters/{adapter_id}/files/adapter.safetensors"),
        ("DELETE", f"/v1/adapters/{adapter_id}"),
    ]:
        response = client.request(method, path, headers=alice)
        missing = client.request(method, path.replace(job_id, "job-000000000000").replace(adapter_id, "ad-0000000000000000"),
                                 headers=alice)
        assert response.status_code == 404, (method, path, response.text)
        assert missing.status_code == 404 and response.json()["detail"]["field"] == missing.json()["detail"]["field"]
    # "use": serving resolves an adapter for a tenant before routing a generate request.
    from cluster.service import NotFound

    with pytest.raises(NotFound):
        plane.resolve_adapter_for_use("alice", adapter_id)
    # Submitting into bob's tenant with alice's key is refused, naming the field.
    response = submit_json(client, keys["alice"], "bob")
    assert response.status_code == 422 and response.json()["detail"]["field"] == "spec.tenant"
    # Bob still sees and can download his own things.
    bob = auth(keys["bob"])
    assert client.get(f"/v1/tunings/{job_id}", headers=bob).json()["state"] == "succeeded"
    download = client.get(f"/v1/adapters/{adapter_id}/files/adapter.safetensors", headers=bob)
    assert download.status_code == 200
    assert download.content == plane.adapter_file("bob", adapter_id, "adapter.safetensors")


def _nothing_stored(plane, tenant="alice"):
    with plane.db.read() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 0
    jobs_dir = os.path.join(plane.store.path(tenant), "jobs")
    assert not os.path.exists(jobs_dir) or os.listdir(jobs_dir) == []


def test_malformed_json_gets_400(client, keys, plane):
    response = client.post("/v1/tunings", content=b'{"spec": {', headers={**auth(keys["alice"]), "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"]["field"] == "body"
    _nothing_stored(plane)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"train": {"resolution": 65, "steps": 4}}, "spec.train.resolution"),
    ({"name": "Bad Name!"}, "spec.name"),
    ({"subjects": [{"token": "<s1>", "class_word": "", "images": ["a.png"]}]}, "spec.subjects.0.class_word"),
    ({"subjects": [{"token": "<s1>", "class_word": "cat", "images": ["a.png"]}] * 2}, "spec.subjects.1.token"),
    ({"surprise": 1}, "spec.surprise"),
])
def test_invalid_spec_names_the_field(client, keys, plane, overrides, field):
    response = submit_json(client, keys["alice"], "alice", **overrides)
    assert response.status_code == 422 and response.json()["detail"]["field"] == field, response.text
    _nothing_stored(plane)


def test_too_many_images(client, keys, plane):
    images = {f"i{n}.png": base64.b64encode(png_bytes()).decode() for n in range(7)}  # limit is 6 in tests
    response = submit_json(client, keys["alice"], "alice", images=images)
    assert response.status_code == 413, response.text  # the status docs/clients.md and the OpenAPI document give
    assert response.json()["detail"] == {"field": "images", "message": "7 images; at most 6 per job", "code": "too_many_images"}
    files = [("files", (f"i{n}.png", png_bytes(), "image/png")) for n in range(7)]
    multipart = client.post("/v1/tunings", data={"spec": json.dumps(spec_dict("alice"))}, files=files, headers=auth(keys["alice"]))
    assert multipart.status_code == 413 and multipart.json()["detail"]["code"] == "too_many_images", multipart.text
    _nothing_stored(plane)


def test_oversized_image(client, keys, plane):
    big = base64.b64encode(b"\x89PNG" + os.urandom(250_000)).decode()  # limit is 200 kB in tests
    response = submit_json(client, keys["alice"], "alice", images={"a.png": big})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "images.a.png"
    _nothing_stored(plane)


def test_request_over_size_limit_gets_413(plane, keys):
    small = plane.settings.model_copy(update={"limits": plane.settings.limits.model_copy(update={"max_request_bytes": 10_000})})
    from cluster.service import ControlPlane

    app = create_app(plane=ControlPlane(settings=small, db=plane.db, store=plane.store), notify=lambda _: None)
    with TestClient(app) as client:
        response = submit_json(client, keys["alice"], "alice", images={"a.png": base64.b64encode(os.urandom(20_000)).decode()})
    assert response.status_code == 413
    _nothing_stored(plane)


def test_non_image_file(client, keys, plane):
    response = submit_json(client, keys["alice"], "alice", images={"a.png": base64.b64encode(b"#!/bin/sh\nrm -rf /\n").decode()})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "images.a.png"
    _nothing_stored(plane)


@pytest.mark.parametrize("name", ["../a.png", "..", "/etc/a.png", "x/../../a.png", "%2e%2e%2fa.png", "s3:a.png"])
def test_path_traversal_names(client, keys, plane, name):
    spec = spec_dict("alice", images=(name,))
    response = client.post("/v1/tunings", json={"spec": spec, "images": {name: base64.b64encode(png_bytes()).decode()}},
                           headers=auth(keys["alice"]))
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] in (f"images.{name}", "spec.subjects.0.images.0", "spec.subjects.0.images")
    _nothing_stored(plane)


def test_multipart_submission_and_events(client, keys, plane):
    spec = spec_dict("alice", images=("cat1.png", "cat2.png"))
    files = [("files", ("cat1.png", png_bytes(), "image/png")), ("files", ("cat2.png", png_bytes(80), "image/png"))]
    response = client.post("/v1/tunings", data={"spec": json.dumps(spec)}, files=files, headers=auth(keys["alice"]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "queued" and job["spec"]["subjects"][0]["images"] == ["cat1.png", "cat2.png"]
    finish_all(plane)
    with client.stream("GET", f"/v1/tunings/{job['id']}/events", headers=auth(keys["alice"])) as stream:
        body = "".join(stream.iter_text())
    states = [json.loads(line[6:])["state"] for line in body.splitlines()
              if line.startswith("data: ") and '"kind":"state"' in line]
    assert states == ["queued", "admitted", "running", "succeeded"]
    assert "event: end" in body


def test_cancel_and_adapter_delete(client, keys, plane):
    job_id = submit_json(client, keys["alice"], "alice").json()["id"]
    response = client.post(f"/v1/tunings/{job_id}/cancel", headers=auth(keys["alice"]))
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert client.post(f"/v1/tunings/{job_id}/cancel", headers=auth(keys["alice"])).status_code == 409
    # DELETE removes the (cancelled) job; then it is gone.
    deleted = client.delete(f"/v1/tunings/{job_id}", headers=auth(keys["alice"]))
    assert deleted.status_code == 200 and deleted.json()["state"] == "cancelled", deleted.text
    assert deleted.json()["freed_input_bytes"] == 0  # cancelling had freed them already
    assert client.get(f"/v1/tunings/{job_id}", headers=auth(keys["alice"])).status_code == 404
    assert client.delete(f"/v1/tunings/{job_id}", headers=auth(keys["alice"])).status_code == 404
    second = submit_json(client, keys["alice"], "alice").json()["id"]
    finish_all(plane)
    adapter = client.get("/v1/adapters", headers=auth(keys["alice"])).json()
    assert [a["job_id"] for a in adapter] == [second] and adapter[0]["version"] == 1
    assert client.delete(f"/v1/adapters/{adapter[0]['id']}", headers=auth(keys["alice"])).status_code == 200
    assert client.get(f"/v1/adapters/{adapter[0]['id']}", headers=auth(keys["alice"])).status_code == 404
    assert not plane.store.exists("alice", "adapters", adapter[0]["id"])


def test_admin_manages_tenants_quotas_and_keys(client, keys):
    admin = auth(keys["admin"])
    created = client.post("/v1/admin/tenants", json={"name": "carol", "weight": 2, "max_concurrent_jobs": 3}, headers=admin)
    assert created.status_code == 201 and created.json()["weight"] == 2
    assert client.post("/v1/admin/tenants", json={"name": "carol"}, headers=admin).status_code == 409
    bad = client.post("/v1/admin/tenants", json={"name": "Carol/../x"}, headers=admin)
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "name"
    patched = client.patch("/v1/admin/tenants/carol", json={"gpu_hours_per_30d": 12.5}, headers=admin)
    assert patched.json()["gpu_hours_per_30d"] == 12.5
    assert client.patch("/v1/admin/tenants/carol", json={"weight": -1}, headers=admin).status_code == 422
    key = client.post("/v1/admin/keys", json={"scope": "tenant", "tenant": "carol"}, headers=admin).json()
    assert key["key"].startswith("ct2i_")
    assert client.get("/v1/tunings", headers=auth(key["key"])).status_code == 200
    assert "key" not in client.get("/v1/admin/keys", params={"tenant": "carol"}, headers=admin).json()[0]
    assert [t["name"] for t in client.get("/v1/admin/tenants", headers=admin).json()] == ["alice", "bob", "carol"]


# -- bad input found by probing a running instance (issue 12, items 7 and 8) ----------------------------

NESTED = b"[" * 3000 + b"]" * 3000
HUGE_INT = b"9" * 5000
INT64_PAST = str(2**63).encode()


def _spec_json(**overrides) -> bytes:
    spec = spec_dict("alice")
    spec.update(overrides)
    return json.dumps({"spec": spec, "images": {"a.png": base64.b64encode(png_bytes()).decode()}}).encode()


BAD_REQUESTS = [
    # (name, method, path, key, body, extra headers, status, field)
    ("JSON nested 3000 deep", "POST", "/v1/tunings", "alice", NESTED, {}, 400, "body"),
    ("a 5000-digit integer", "POST", "/v1/tunings", "alice",
     b'{"spec": {"tenant": "alice", "train": {"steps": ' + HUGE_INT + b"}}}", {}, 400, "body"),
    ("steps 10^19", "POST", "/v1/tunings", "alice", _spec_json(train={"resolution": 64, "steps": 10**19}), {}, 422,
     "spec.train.steps"),
    ("Last-Event-ID past int64", "GET", "/v1/tunings/{job}/events", "alice", None, {"Last-Event-ID": "9" * 30}, 422,
     "last-event-id"),
    ("max_stored_bytes past int64", "PATCH", "/v1/admin/tenants/alice", "admin", b'{"max_stored_bytes": ' + INT64_PAST + b"}", {},
     422, "max_stored_bytes"),
    ("generate_rpm past int64", "PATCH", "/v1/admin/tenants/alice", "admin", b'{"generate_rpm": ' + INT64_PAST + b"}", {}, 422,
     "generate_rpm"),
    ("weight infinity", "PATCH", "/v1/admin/tenants/alice", "admin", b'{"weight": 1e999}', {}, 422, "weight"),
    # Tenants name bases the operator offers, never server paths (item 8).
    ("base_model a server path", "POST", "/v1/tunings", "alice", _spec_json(base_model="/etc"), {}, 422, "spec.base_model"),
    ("base_model the data folder", "POST", "/v1/tunings", "alice", _spec_json(base_model="/root/.ct2i"), {}, 422,
     "spec.base_model"),
    ("base_model a hub id not offered", "POST", "/v1/tunings", "alice",
     _spec_json(base_model="stabilityai/stable-diffusion-xl-base-1.0"), {}, 422, "spec.base_model"),
    ("image_encoder a server path", "POST", "/v1/tunings", "alice", _spec_json(image_encoder="/etc/passwd"), {}, 422,
     "spec.image_encoder"),
    # Placement (item 4): no node of this machine holds a 64-CPU worker.
    ("a worker no node can hold", "POST", "/v1/tunings", "alice",
     _spec_json(resources={"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 64}), {}, 422, "spec.resources"),
]


@pytest.mark.parametrize("name, method, path, who, body, headers, status, field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_a_4xx_naming_its_field_and_stores_nothing(client, keys, plane, name, method, path, who, body, headers,
                                                                 status, field):
    from cluster.db import JobEvent, Tenant

    existing = submit_json(client, keys["alice"], "alice").json()["id"]  # an earlier good job, for the events route
    with plane.db.read() as session:
        before = (session.execute(select(func.count()).select_from(JobEvent)).scalar_one(),
                  session.get(Tenant, "alice").max_stored_bytes)
    response = client.request(method, path.format(job=existing), content=body,
                              headers={**auth(keys[who]), "Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert response.json()["detail"]["field"] == field, response.json()
    with plane.db.read() as session:
        assert session.execute(select(func.count()).select_from(Job)).scalar_one() == 1
        after = (session.execute(select(func.count()).select_from(JobEvent)).scalar_one(),
                 session.get(Tenant, "alice").max_stored_bytes)
    assert after == before, "a refused request changed what is stored"
    jobs_dir = os.path.join(plane.store.path("alice"), "jobs")
    assert os.listdir(jobs_dir) == [existing]
    # The next good request is served.
    assert submit_json(client, keys["alice"], "alice").status_code == 201


def test_offered_base_names_run_on_their_configured_source(client, keys, plane):
    from cluster.runner import resolved_spec
    from cluster.service import ControlPlane

    offering = plane.settings.model_copy(update={"base_models": {"tiny": "tiny", "house-sdxl": "/models/sdxl"}})
    app = create_app(plane=ControlPlane(settings=offering, db=plane.db, store=plane.store), notify=lambda _: None)
    with TestClient(app) as offered:
        response = submit_json(offered, keys["alice"], "alice", base_model="house-sdxl")
    assert response.status_code == 201, response.text
    job = plane.get_job("alice", response.json()["id"])
    assert job.spec.base_model == "house-sdxl"  # the tenant's name is what is stored and shown
    assert resolved_spec(offering, job.spec).base_model == "/models/sdxl"  # the run gets the operator's source


def test_openapi_names_tuning_spec_and_every_model(client):
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert {"TuningSpec", "TuningRequest", "JobView", "AdapterView", "TenantView", "KeyView", "CreatedKey", "Quotas",
            "TenantCreate", "KeyCreate", "WebhookSet", "UsageView", "Resources", "TrainConfig"} <= set(schemas)
    submit = document["paths"]["/v1/tunings"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TuningRequest"}
    assert schemas["TuningRequest"]["properties"]["spec"] == {"$ref": "#/components/schemas/TuningSpec"}
    assert "multipart/form-data" in submit["requestBody"]["content"]
    assert schemas["JobView"]["properties"]["state"] == {"$ref": "#/components/schemas/JobState"}
