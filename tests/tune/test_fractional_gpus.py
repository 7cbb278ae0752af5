"""Fractional GPUs: with one (fake) GPU, two 0.5-GPU jobs are admitted together and a third waits."""

from __future__ import annotations

import time

import pytest

from cluster.runner import RayTaskRunner
from cluster.scheduler import Scheduler
from tests.cluster.fake_trainer import FakeTrainer, FileGate
from tests.tune.conftest import png_bytes

# The session's Ray has one logical GPU: Ray schedules against it; nothing touches CUDA.
pytestmark = [pytest.mark.timeout(300)]


def _spec(tenant: str) -> dict:
    return {"tenant": tenant, "name": "half", "base_model": "tiny",
            "subjects": [{"token": "<s1>", "class_word": "cat", "images": ["a.png"]}],
            "train": {"resolution": 64, "steps": 400, "checkpoint_every": 100},
            "resources": {"num_workers": 1, "gpus_per_worker": 0.5, "cpus_per_worker": 0.5}}


def test_two_half_gpu_jobs_run_together_and_a_third_waits(ray_cluster, settings, plane, tmp_path):
    import ray

    settings = settings.model_copy(update={"capacity_gpus": None})  # capacity = the cluster's GPUs
    plane_jobs = []
    for tenant in ("acme", "globex", "initech"):
        plane.create_tenant(tenant)
        plane_jobs.append(plane.submit(tenant, _spec(tenant), {"a.png": png_bytes((200, 50, 50))}).id)
        time.sleep(0.01)  # distinct submission times: FIFO order is then the list order
    scheduler = Scheduler(settings, RayTaskRunner(FakeTrainer(FileGate(tmp_path / "gate")), num_cpus=0.5))  # they hold at step 1
    assert scheduler.capacity_gpus() == 1.0
    deadline = time.time() + 120
    states = []
    while time.time() < deadline:
        scheduler.tick()
        states = [plane.get_job(None, job_id).state for job_id in plane_jobs]
        if states.count("running") == 2:
            break
        time.sleep(0.3)
    assert sorted(states) == ["queued", "running", "running"], states
    waiting = plane.get_job(None, plane_jobs[states.index("queued")])
    assert waiting.queue_reason and "GPU" in waiting.queue_reason
    # Ray itself holds both half-GPU tasks at once: the single GPU is fully used.
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0)
    for job_id in plane_jobs:
        plane.cancel_job(None, job_id)
    scheduler.tick()
