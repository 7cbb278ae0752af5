"""`publish: {compress: ...}`: after a `full` tune succeeds, the control plane also publishes the compressed LoRA
adapter as the next version of the same name, both kept; a spec that cannot be honoured is refused naming the field.

The tune is the real trainer (`InlineRunner()`, `local_train_fn`) on the tiny preset, and the compression the real
`causalt2i.compress` (`local_compress_fn`), in the attempt's thread as a Ray task would run it."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from causalt2i.adapter import load_adapter
from causalt2i.compress import retained_energy
from cluster.api import create_app
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from tests.cluster.conftest import png_bytes, spec_dict, with_timing


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _submit(client, key, tenant, **overrides):
    spec = spec_dict(tenant, "pets", steps=2, lr=5e-3)
    spec.update(overrides)
    return client.post("/v1/tunings", json={"spec": spec, "images": {"a.png": base64.b64encode(png_bytes()).decode()}},
                       headers=_auth(key))


@pytest.fixture
def setup(plane):
    plane.create_tenant("acme")
    plane.create_tenant("rival")
    keys = {t: plane.create_key("tenant", t).key for t in ("acme", "rival")}
    client = TestClient(create_app(plane=plane, notify=lambda job_id: None))
    return client, keys


def _run_to_end(plane, job_id, timeout=600.0):
    torch.set_num_threads(1)
    scheduler = Scheduler(with_timing(plane.settings, heartbeat_seconds=0.5, progress_write_seconds=0.0),
                          InlineRunner(), capacity_gpus=4)
    deadline = time.time() + timeout
    while time.time() < deadline:
        scheduler.tick()
        job = plane.get_job(None, job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s")


def test_a_full_tune_with_publish_compress_gives_both_versions(plane, setup, tmp_path):
    client, keys = setup
    acme = _auth(keys["acme"])
    response = _submit(client, keys["acme"], "acme", publish={"compress": {"energy": 0.99, "fidelity_steps": 1}})
    assert response.status_code == 201, response.text
    job = _run_to_end(plane, response.json()["id"])
    assert job.state == "succeeded", (job.message, job.error)

    listed = client.get("/v1/adapters", headers=acme).json()
    assert sorted((a["name"], a["version"], a["param_mode"]) for a in listed) == [("pets", 1, "full"), ("pets", 2, "lora")]
    full, small = sorted(listed, key=lambda a: a["version"])
    assert job.adapter_id == full["id"]
    assert client.get("/v1/adapters", headers=_auth(keys["rival"])).json() == []

    def fetch(adapter_id, name):
        got = client.get(f"/v1/adapters/{adapter_id}/files/{name}", headers=acme)
        assert got.status_code == 200, got.text
        (tmp_path / adapter_id).mkdir(exist_ok=True)
        (tmp_path / adapter_id / name).write_bytes(got.content)

    for adapter in (full, small):
        for name in ("adapter.safetensors", "manifest.json"):
            fetch(adapter["id"], name)
    full_adapter, lora_adapter = (load_adapter(tmp_path / a["id"]) for a in (full, small))
    record = lora_adapter.manifest.compressed_from
    assert lora_adapter.manifest.param_mode == "lora" and record is not None
    assert record.energy == 0.99 and record.rank is None
    assert record.source_sha256 == full_adapter.manifest.tensors_sha256 and record.source_step == full_adapter.manifest.step
    fidelity = record.fidelity
    assert fidelity.steps == 1 and fidelity.max_abs_diff >= 0 and len(fidelity.prompts) * len(fidelity.seeds) >= 2
    # The recorded energies are what the stored factors retain of the published full adapter's ΔW (base needed: tiny).
    from causalt2i.compress import attn2_deltas
    from causalt2i.models import attn2_state, load_sdxl

    deltas = attn2_deltas(full_adapter, attn2_state(load_sdxl("tiny").unet))
    factors = lora_adapter.lora_factors()
    assert {f"{module}.weight" for module in factors} == set(record.retained_energy) == set(record.ranks)
    for name, kept in record.retained_energy.items():
        assert kept >= 0.99, (name, kept)
        assert retained_energy(deltas[name], factors[name.removesuffix(".weight")]) == pytest.approx(kept, abs=1e-6), name
    assert lora_adapter.manifest.tensors_bytes < full_adapter.manifest.tensors_bytes
    # The compressed version is what the full one was not: a LoRA export works.
    export = client.get(f"/v1/adapters/{small['id']}/export", params={"format": "diffusers"}, headers=acme)
    assert export.status_code == 200, export.text
    assert "pytorch_lora_weights.safetensors" in zipfile.ZipFile(io.BytesIO(export.content)).namelist()
    events = [json.loads(line[len("data: "):]) for line in client.get(f"/v1/tunings/{job.id}/events", headers=acme).text.splitlines()
              if line.startswith("data: ")]
    assert any((e.get("data") or {}).get("compressed_from") == full["id"] for e in events), events


@pytest.mark.parametrize("publish, field", [
    ({"compress": {"energy": 0.99, "ratio": 2}}, "spec.publish.compress.ratio"),
    ({"compress": {}}, "spec.publish.compress"),
    ({"compress": {"rank": 4, "energy": 0.9}}, "spec.publish.compress"),
    ({"compress": {"energy": 1.5}}, "spec.publish.compress.energy"),
    ({"compress": {"rank": 0}}, "spec.publish.compress.rank"),
    ({"squash": True}, "spec.publish.squash"),
])
def test_a_bad_publish_spec_is_refused_naming_the_field(plane, setup, publish, field):
    client, keys = setup
    response = _submit(client, keys["acme"], "acme", publish=publish)
    assert response.status_code == 422 and response.json()["detail"]["field"] == field, response.text
    assert plane.list_jobs(None) == []


def test_a_lora_tune_cannot_ask_for_compression(plane, setup):
    client, keys = setup
    response = _submit(client, keys["acme"], "acme", train={"resolution": 64, "steps": 6, "param_mode": "lora"},
                       publish={"compress": {"rank": 4}})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "spec.publish.compress" and "param_mode" in detail["message"], detail
    assert plane.list_jobs(None) == []
