"""Submit refuses a spec whose GPU memory plan (causalt2i.plan) exceeds its gpus_per_worker share."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cluster.api import create_app
from cluster.db import Job
from cluster.service import ControlPlane
from tests.cluster.conftest import png_bytes, spec_dict

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
OFFERED = {"tiny": "tiny", "sdxl": SDXL}  # tenants name offered bases; the plan is of the hub id behind the name


@pytest.fixture
def submit(plane):
    """POST /v1/tunings as tenant alice, on a control plane configured with `gpu_memory_gb`."""
    plane.create_tenant("alice")
    key = plane.create_key("tenant", "alice").key

    def post(spec: dict, gpu_memory_gb: float = 80.0):
        configured = ControlPlane(settings=plane.settings.model_copy(update={"gpu_memory_gb": gpu_memory_gb, "base_models": OFFERED}), db=plane.db, store=plane.store)
        with TestClient(create_app(plane=configured, notify=lambda _job: None)) as client:
            return client.post("/v1/tunings", json={"spec": spec, "images": {"a.png": base64.b64encode(png_bytes()).decode()}},
                               headers={"Authorization": f"Bearer {key}"})

    return post


def _jobs(plane) -> int:
    with plane.db.read() as session:
        return session.execute(select(func.count()).select_from(Job)).scalar_one()


def _stored_files(plane) -> list:
    jobs = Path(plane.store.path("alice")) / "jobs"
    return sorted(jobs.rglob("*")) if jobs.exists() else []


def test_real_sdxl_full_mode_at_a_quarter_gpu_is_refused_naming_gpus_per_worker(plane, submit):
    spec = {**spec_dict("alice"), "base_model": "sdxl"}
    spec["train"] = {"resolution": 1024, "steps": 4, "param_mode": "full"}
    spec["resources"]["gpus_per_worker"] = 0.25
    response = submit(spec)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "spec.resources.gpus_per_worker"
    assert "20.0 GB" in detail["message"] and "needs" in detail["message"]
    assert _jobs(plane) == 0 and _stored_files(plane) == []


def test_the_configured_gpu_memory_decides_and_a_fitting_spec_is_queued(plane, submit):
    spec = spec_dict("alice")  # tiny, one whole GPU: ~1.1 GB with the CUDA context allowance
    spec["resources"]["gpus_per_worker"] = 0.5
    refused = submit(spec, gpu_memory_gb=1.0)
    assert refused.status_code == 422 and refused.json()["detail"]["field"] == "spec.resources.gpus_per_worker"
    assert _jobs(plane) == 0 and _stored_files(plane) == []
    accepted = submit(spec, gpu_memory_gb=80.0)
    assert accepted.status_code == 201, accepted.text
    assert _jobs(plane) == 1


def test_the_gpu_memory_setting_is_read_from_the_environment():
    from cluster.config import ControlPlaneSettings

    assert ControlPlaneSettings.from_env({"CT2I_HOME": "/tmp/x"}).gpu_memory_gb == 80.0
    assert ControlPlaneSettings.from_env({"CT2I_HOME": "/tmp/x", "CT2I_GPU_MEMORY_GB": "141"}).gpu_memory_gb == 141.0
