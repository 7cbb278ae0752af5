"""The tuning tests' control plane (SQLite in a temp folder); Ray is the session's (`ray_cluster`)."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.service import ControlPlane


@pytest.fixture
def settings(tmp_path) -> ControlPlaneSettings:
    return ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'ct2i.db'}",
                                artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=2,
                                scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.5, "lease_seconds": 60.0,
                                           "progress_write_seconds": 0.0})


@pytest.fixture
def plane(settings) -> ControlPlane:
    return ControlPlane.open(settings)


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (size, size), (240, 240, 240))
    image.paste(Image.new("RGB", (size // 2, size // 2), color), (size // 4, size // 4))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def two_subject_spec(tenant: str, name: str, *, steps: int = 4, checkpoint_every: int = 2, num_workers: int = 1,
                     gpus_per_worker: float = 0.0, **train) -> tuple[dict, dict[str, bytes]]:
    spec = {
        "tenant": tenant,
        "name": name,
        "base_model": "tiny",
        "subjects": [
            {"token": "<s1>", "class_word": "cat", "images": ["cat1.png", "cat2.png"]},
            {"token": "<v1>", "class_word": "dog", "images": ["dog1.png", "dog2.png"]},
        ],
        "train": {"resolution": 64, "steps": steps, "checkpoint_every": checkpoint_every, **train},
        "resources": {"num_workers": num_workers, "gpus_per_worker": gpus_per_worker, "cpus_per_worker": 1},
    }
    images = {"cat1.png": png_bytes((200, 60, 40)), "cat2.png": png_bytes((190, 70, 50)),
              "dog1.png": png_bytes((40, 60, 200)), "dog2.png": png_bytes((50, 80, 190))}
    return spec, images


def run_until_done(scheduler, plane, job_ids, timeout: float = 400.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        scheduler.tick()
        states = [plane.get_job(None, job_id).state for job_id in job_ids]
        if all(state in ("succeeded", "failed", "cancelled") for state in states):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs did not finish in {timeout} s: {states}")
