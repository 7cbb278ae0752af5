"""Ray Train runs of CausalT2I under DeepSpeed ZeRO-2 (CPU, gloo), through the control plane. A run that loses a
worker and resumes is a fault run: tests/faults/test_train_worker_loss.py (`make cluster-faults`)."""

from __future__ import annotations

import pytest

from cluster.scheduler import Scheduler
from tests.tune.conftest import run_until_done, two_subject_spec
from tune.runner import ray_train_runner

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_a_worker_group_that_cannot_start_fails_the_job_within_the_timeout(settings, plane):
    """Every node could hold one worker, so submit admits the job; but another user's actor holds the CPUs it
    needs, so its worker group cannot start: the job fails with that reason after the configured timeout
    instead of waiting for ever."""
    import time

    import ray

    from cluster.config import ControlPlaneSettings

    class Squatter:
        def ready(self):
            return True

    # The worker asks for the node's every CPU, the squatter holds all but one of those free now: the worker
    # group cannot start while it lives, even if other tests' actors on the session Ray free theirs meanwhile
    # (a worker sized "free - 1 + 1" once started when they did).
    node_cpus = ray.cluster_resources()["CPU"]
    held = max(1.0, ray.available_resources()["CPU"] - 1)
    squatter = ray.remote(num_cpus=held)(Squatter).remote()
    ray.get(squatter.ready.remote())
    try:
        quick = ControlPlaneSettings(**{**settings.model_dump(), "scheduler": {**settings.scheduler.model_dump(),
                                                                               "worker_start_timeout_s": 5.0}})
        plane.create_tenant("acme")
        spec, images = two_subject_spec("acme", "blocked", steps=2, checkpoint_every=2, num_workers=1)
        spec["resources"]["cpus_per_worker"] = node_cpus
        job = plane.submit("acme", spec, images)
        started = time.monotonic()
        run_until_done(Scheduler(quick, ray_train_runner()), plane, [job.id], timeout=240)
        done = plane.get_job("acme", job.id)
        assert done.state == "failed" and done.attempts == 1
        assert "could not start within 5 s" in done.error and "resources" in done.error, done.error
        assert time.monotonic() - started < 200
        assert plane.list_adapters("acme") == []
    finally:
        ray.kill(squatter)
