"""A tenant's own API keys over REST (`/v1/keys`), and the admin's queue view (`/v1/admin/queue`)."""

from __future__ import annotations

import time

import pytest

from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from cluster.schemas import Quotas
from cluster.service import MAX_LIVE_KEYS_PER_TENANT
from tests.cluster.conftest import png_bytes, spec_dict, with_timing
from tests.cluster.fake_trainer import FakeTrainer, ThreadGate


@pytest.fixture
def keys(plane):
    plane.create_tenant("alice")
    plane.create_tenant("bob")
    return {"admin": plane.create_key("admin").key, "alice": plane.create_key("tenant", "alice", "first").key,
            "bob": plane.create_key("tenant", "bob").key}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_tenant_creates_lists_and_revokes_its_own_keys(client, keys):
    created = client.post("/v1/keys", json={"label": "laptop"}, headers=auth(keys["alice"]))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("ct2i_") and body["tenant"] == "alice" and body["scope"] == "tenant"
    assert body["label"] == "laptop" and body["revoked_at"] is None
    new = auth(body["key"])
    assert client.get("/v1/tunings", headers=new).status_code == 200  # the new key works at once

    listed = client.get("/v1/keys", headers=new).json()
    assert [(k["label"], k["tenant"]) for k in listed] == [("first", "alice"), ("laptop", "alice")]
    assert all("key" not in k for k in listed)  # secrets are shown once, at creation only

    revoked = client.delete(f"/v1/keys/{body['id']}", headers=auth(keys["alice"]))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/v1/tunings", headers=new).status_code == 401  # at once: keys are checked on every request
    assert client.get("/v1/tunings", headers=auth(keys["alice"])).status_code == 200


def test_revoking_the_key_in_use_is_allowed_and_it_then_gets_401(client, keys, plane):
    mine = next(k.id for k in plane.list_keys("alice"))
    response = client.delete(f"/v1/keys/{mine}", headers=auth(keys["alice"]))
    assert response.status_code == 200, response.text
    after = client.get("/v1/keys", headers=auth(keys["alice"]))
    assert after.status_code == 401
    assert after.json()["detail"] == {"field": "authorization", "message": "missing, unknown or revoked API key",
                                      "code": "unauthenticated"}


def test_tenant_b_cannot_see_or_revoke_tenant_a_keys(client, keys, plane):
    alice_key = next(k.id for k in plane.list_keys("alice"))
    admin_key = next(k.id for k in plane.list_keys() if k.scope == "admin")
    assert [k["tenant"] for k in client.get("/v1/keys", headers=auth(keys["bob"])).json()] == ["bob"]
    for key_id in (alice_key, admin_key, "key-missing"):
        response = client.delete(f"/v1/keys/{key_id}", headers=auth(keys["bob"]))
        assert response.status_code == 404, response.text
        assert response.json()["detail"]["field"] == "key_id" and response.json()["detail"]["code"] == "not_found"
    # ...and the same answer for another tenant's key as for a missing one, so ids cannot be probed.
    assert client.delete(f"/v1/keys/{alice_key}", headers=auth(keys["bob"])).json()["detail"]["message"] == f"no key {alice_key!r}"
    assert client.get("/v1/tunings", headers=auth(keys["alice"])).status_code == 200
    assert all(k.revoked_at is None for k in plane.list_keys())


def test_key_bodies_are_strict_and_admin_keys_have_no_own_keys(client, keys):
    for body in ({"label": "x", "scope": "admin"}, {"label": "x", "tenant": "bob"}, {"label": "x" * 201}, {"label": 3}):
        response = client.post("/v1/keys", json=body, headers=auth(keys["alice"]))
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"]["field"] in ("scope", "tenant", "label"), response.text
    assert [k["scope"] for k in client.get("/v1/keys", headers=auth(keys["bob"])).json()] == ["tenant"]
    refused = client.post("/v1/keys", json={}, headers=auth(keys["admin"]))
    assert refused.status_code == 403 and refused.json()["detail"]["field"] == "authorization"
    assert client.get("/v1/keys", headers=auth(keys["admin"])).status_code == 403


def test_a_tenant_holds_a_bounded_number_of_live_keys(client, keys, plane):
    for _ in range(MAX_LIVE_KEYS_PER_TENANT - 1):
        plane.create_own_key("bob")
    refused = client.post("/v1/keys", json={}, headers=auth(keys["bob"]))
    assert refused.status_code == 409 and refused.json()["detail"]["field"] == "keys", refused.text
    spare = next(k.id for k in plane.list_keys("bob") if k.label == "" and k.id != plane.authenticate(keys["bob"]).key_id)
    assert client.delete(f"/v1/keys/{spare}", headers=auth(keys["bob"])).status_code == 200
    assert client.post("/v1/keys", json={}, headers=auth(keys["bob"])).status_code == 201


def test_the_admin_sees_every_tenant_queue_and_the_gpus_in_use(client, keys, plane):
    plane.set_quota("alice", Quotas(max_concurrent_jobs=1))
    plane.create_tenant("carol")
    jobs = {}
    for tenant, name, gpus in (("alice", "one", 1), ("alice", "two", 1), ("bob", "cpu", 0)):
        spec = spec_dict(tenant, name)
        spec["resources"]["gpus_per_worker"] = gpus
        jobs[name] = plane.submit(tenant, spec, {"a.png": png_bytes()}).id
        time.sleep(0.01)  # distinct created_at, so queue order is by submission
    gate = ThreadGate()  # admitted runs wait here: the test sees them running
    scheduler = Scheduler(with_timing(plane.settings, heartbeat_seconds=0.2, progress_write_seconds=0.0),
                          InlineRunner(FakeTrainer(gate)), capacity_gpus=4)
    try:
        scheduler.tick()
        deadline = time.time() + 20
        while time.time() < deadline and {plane.get_job(None, jobs[n]).state for n in ("one", "cpu")} != {"running"}:
            time.sleep(0.05)
        response = client.get("/v1/admin/queue", headers=auth(keys["admin"]))
        assert response.status_code == 200, response.text
        view = response.json()
        assert [t["tenant"] for t in view["tenants"]] == ["alice", "bob", "carol"]
        alice, bob, carol = view["tenants"]
        assert [(j["name"], j["state"], j["position"]) for j in alice["jobs"]] == [("one", "running", None), ("two", "queued", 1)]
        assert alice["jobs"][1]["queue_reason"] == "tenant at its concurrency limit: 1 of 1 jobs running"
        assert (alice["queued_jobs"], alice["running_jobs"], alice["gpus_in_use"], alice["max_concurrent_jobs"]) == (1, 1, 1.0, 1)
        # A CPU job holds a capacity unit per worker but no GPU.
        assert (bob["running_jobs"], bob["demand_gpus_in_use"], bob["gpus_in_use"]) == (1, 1.0, 0.0)
        assert carol["jobs"] == [] and carol["queued_jobs"] == 0
        assert view["cluster"] == {"capacity_units": plane.settings.capacity_gpus, "node_gpus": None, "demand_gpus_in_use": 2.0, "gpus_in_use": 1.0,
                                   "running_jobs": 2, "queued_jobs": 1}
        # Tenant keys are refused; a tenant sees its own queue through /v1/tunings and /v1/usage.
        refused = client.get("/v1/admin/queue", headers=auth(keys["alice"]))
        assert refused.status_code == 403 and refused.json()["detail"]["field"] == "authorization"
    finally:
        for job_id in jobs.values():
            if plane.get_job(None, job_id).state not in ("succeeded", "failed", "cancelled"):
                plane.cancel_job(None, job_id)
        gate.open()
        scheduler.tick()


def test_me_names_the_key_and_usage_shows_the_quotas_beside_what_uses_them(client, keys, plane):
    plane.set_quota("alice", Quotas(max_concurrent_jobs=3, max_adapters=7, generate_rpm=90))
    me = client.get("/v1/me", headers=auth(keys["alice"])).json()
    assert me == {"key_id": plane.authenticate(keys["alice"]).key_id, "scope": "tenant", "tenant": "alice"}
    assert client.get("/v1/me", headers=auth(keys["admin"])).json()["scope"] == "admin"
    assert client.get("/v1/me", headers=auth(keys["admin"])).json()["tenant"] is None
    usage = client.get("/v1/usage", headers=auth(keys["alice"])).json()
    assert (usage["max_concurrent_jobs"], usage["max_adapters"], usage["generate_rpm"]) == (3, 7, 90)
    assert usage["max_concurrent_gpus"] == plane.get_tenant("alice").max_concurrent_gpus
