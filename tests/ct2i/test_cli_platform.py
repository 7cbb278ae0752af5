"""The control-plane CLI: local embedded default and `--api` remote (HttpAPI over the real ASGI app), tables and
--json with ISO-8601 times, one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from ct2i import cli_platform
from ct2i.cli import main
from tests.cluster.conftest import png_bytes, spec_dict


@pytest.fixture
def local_env(settings, monkeypatch):
    monkeypatch.setenv("CT2I_HOME", str(settings.home))
    monkeypatch.setenv("CT2I_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CT2I_ARTIFACTS", settings.artifacts_uri)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CT2I_API", raising=False)
    return settings


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_spec(tmp_path, tenant="acme", **overrides):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "cat.png").write_bytes(png_bytes())
    spec = spec_dict(tenant, images=("img/cat.png",))
    spec.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tenants_keys_submit_jobs_adapters_locally(local_env, capsys, tmp_path):
    code, out, _ = run(capsys, "tenants", "create", "acme", "--weight", "2", "--max-concurrent-jobs", "3", "--json")
    assert code == 0 and json.loads(out)["weight"] == 2
    code, out, _ = run(capsys, "tenants", "list")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["NAME", "WEIGHT"] and out.splitlines()[1].startswith("acme")
    assert out.splitlines()[1].split()[-1].endswith("Z") and "T" in out.splitlines()[1].split()[-1]  # ISO-8601 created_at
    code, out, _ = run(capsys, "tenants", "set-quota", "acme", "--gpu-hours-per-30d", "7", "--json")
    assert json.loads(out)["gpu_hours_per_30d"] == 7
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme")
    assert code == 0 and out.splitlines()[1].startswith("ct2i_")
    key_id = out.split()[1]
    code, out, _ = run(capsys, "keys", "revoke", key_id, "--json")
    assert json.loads(out)["revoked_at"] is not None

    code, out, err = run(capsys, "submit", str(write_spec(tmp_path)), "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["state"] == "queued" and job["spec"]["subjects"][0]["images"] == ["s0-0.png"]
    assert job["created_at"].endswith("Z") and job["admitted_at"] is None
    code, out, _ = run(capsys, "--json", "keys", "list", "--tenant", "acme")  # flags before the command, too
    assert code == 0 and [k["id"] for k in json.loads(out)] == [key_id]
    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert [j["id"] for j in json.loads(out)] == [job["id"]]
    code, out, _ = run(capsys, "jobs", "show", job["id"])
    assert code == 0 and "queued" in out
    code, out, _ = run(capsys, "jobs", "cancel", job["id"], "--json")
    assert json.loads(out)["state"] == "cancelled"
    code, out, _ = run(capsys, "jobs", "logs", job["id"])
    assert [line.split()[2] for line in out.splitlines()] == ["queued", "cancelled"]
    code, out, _ = run(capsys, "adapters", "list", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "usage", "acme", "--json")
    usage = json.loads(out)
    assert code == 0 and usage["stored_input_bytes"] == 0 and usage["gpu_seconds_remaining_30d"] > 0  # cancelled: freed
    code, out, _ = run(capsys, "jobs", "delete", job["id"], "--json")
    assert code == 0 and json.loads(out)["id"] == job["id"] and json.loads(out)["state"] == "cancelled"
    code, out, err = run(capsys, "jobs", "show", job["id"])
    assert code == 1 and "no tuning job" in err


@pytest.mark.parametrize(("overrides", "field"), [
    ({"train": {"resolution": 100}}, "train.resolution"),
    ({"tenant": "Not A Tenant"}, "tenant"),
    ({"base_model": "/etc"}, "spec.base_model"),
    ({"resources": {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 64}}, "spec.resources"),
])
def test_bad_spec_is_one_line_error_naming_the_field(local_env, capsys, tmp_path, overrides, field):
    run(capsys, "tenants", "create", "acme")
    code, out, err = run(capsys, "submit", str(write_spec(tmp_path, **overrides)))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and field in err
    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert json.loads(out) == []


def test_non_image_and_unknown_objects_are_errors(local_env, capsys, tmp_path):
    run(capsys, "tenants", "create", "acme")
    path = write_spec(tmp_path)
    (tmp_path / "img" / "cat.png").write_bytes(b"not an image at all")
    code, _, err = run(capsys, "submit", str(path))
    assert code == 1 and "images.s0-0.png" in err
    for argv in (("jobs", "show", "job-nope"), ("adapters", "delete", "ad-nope"), ("tenants", "create", "acme")):
        code, out, err = run(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_remote_api_with_key_from_environment(local_env, capsys, tmp_path, monkeypatch, plane):
    from fastapi.testclient import TestClient

    from cluster.api import create_app
    from cluster.client import HttpAPI

    plane.create_tenant("acme")
    key = plane.create_key("tenant", "acme").key
    app = create_app(plane=plane, notify=lambda _: None)

    class InProcessHttpAPI(HttpAPI):  # the real httpx client, over the in-process ASGI app
        def __init__(self, url, key, **kwargs):
            super().__init__(url, key, client=TestClient(app, base_url=url))

    monkeypatch.setattr(cli_platform, "HttpAPI", InProcessHttpAPI)
    monkeypatch.setenv("CT2I_API_KEY", key)
    code, out, err = run(capsys, "submit", str(write_spec(tmp_path)), "--api", "http://ct2i.test", "--json")
    assert code == 0, err
    job_id = json.loads(out)["id"]
    code, out, _ = run(capsys, "--api", "http://ct2i.test", "jobs", "list")
    assert job_id in out
    code, out, _ = run(capsys, "jobs", "cancel", job_id, "--api", "http://ct2i.test")
    assert code == 0
    code, out, _ = run(capsys, "jobs", "logs", job_id, "--api", "http://ct2i.test", "--json")  # SSE through httpx-sse
    assert [e["state"] for e in json.loads(out)] == ["queued", "cancelled"]
    code, out, err = run(capsys, "jobs", "delete", job_id, "--api", "http://ct2i.test", "--json")  # DELETE /v1/tunings/{id}
    assert code == 0 and json.loads(out)["id"] == job_id, err
    code, _, err = run(capsys, "jobs", "show", job_id, "--api", "http://ct2i.test")
    assert code == 1 and "HTTP 404" in err
    code, _, err = run(capsys, "tenants", "list", "--api", "http://ct2i.test")
    assert code == 1 and "HTTP 403" in err
    code, _, err = run(capsys, "submit", str(write_spec(tmp_path, base_model="/etc")), "--api", "http://ct2i.test")
    assert code == 1 and "HTTP 422: spec.base_model" in err
    monkeypatch.setenv("CT2I_API_KEY", "ct2i_wrong")
    code, _, err = run(capsys, "jobs", "show", job_id, "--api", "http://ct2i.test")
    assert code == 1 and "HTTP 401" in err
