"""A Ray Train worker killed mid-run (moved here from tests/tune/test_ray_train.py: ~160 s of two DeepSpeed
worker starts). Ray Train's `FailureConfig` restarts the lost worker on the same node from the last checkpoint.

Figure (asserted): one restart, from the step-2 checkpoint; checkpoints 2, 4, 6, none recorded twice or
skipped; the job `succeeded` with an adapter that applies. Jobs lost 0, duplicated 0; the seconds from the
kill to the resume event are reported.
"""

from __future__ import annotations

import time

import pytest
import torch

from causalt2i.adapter import AdapterHost, load_adapter
from causalt2i.models import load_sdxl
from cluster.scheduler import Scheduler
from tests.tune.conftest import plane, run_until_done, settings, two_subject_spec  # noqa: F401 (fixtures)
from tune.runner import RayTrainFn, ray_train_runner

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("ray_cluster")]


def _events(plane, job):
    return plane.job_events(job.tenant, job.id)


def test_two_workers_with_a_killed_worker_resume_and_publish_an_adapter_that_applies(settings, plane, tmp_path, fault_figure):
    plane.create_tenant("acme")
    spec, images = two_subject_spec("acme", "cat-dog", steps=6, checkpoint_every=2, num_workers=2)
    job = plane.submit("acme", spec, images)
    marker = tmp_path / "fault-fired"
    runner = ray_train_runner(RayTrainFn(fault={"rank": 1, "step": 3, "marker": str(marker), "delay_s": 3.0}))
    scheduler = Scheduler(settings, runner)
    run_until_done(scheduler, plane, [job.id], timeout=800)

    done = plane.get_job("acme", job.id)
    assert done.state == "succeeded", done.error
    assert marker.exists(), "the fault hook never fired"
    events = _events(plane, done)
    checkpoints = [e.data["step"] for e in events if e.message.startswith("checkpoint at step")]
    resumes = [e.data["resumed_from"] for e in events if e.data and "resumed_from" in e.data]
    assert resumes == [2], f"expected one restart from the step-2 checkpoint, events: {[e.message for e in events]}"
    assert checkpoints == [2, 4, 6], "a checkpoint step was recorded twice or skipped across the restart"
    assert done.progress.step == 6 and done.progress.checkpoint_step == 6

    adapter_view = plane.get_adapter("acme", done.adapter_id)
    local = tmp_path / "adapter"
    plane.store.fetch_dir("acme", ("adapters", adapter_view.id), local)
    adapter = load_adapter(local)
    assert adapter.manifest.step == 6 and adapter.manifest.tenant == "acme"
    host = AdapterHost(load_sdxl("tiny"))
    before = {k: v.clone() for k, v in host._live.items()}
    host.apply(adapter)
    assert any(not torch.equal(before[k], v) for k, v in host._live.items()), "the adapter changed no attn2 tensor"
    killed_at = marker.stat().st_mtime  # the worker wrote the marker, then slept delay_s, then SIGKILLed itself
    resumed_at = next(e.at for e in events if e.data and "resumed_from" in e.data)
    fault_figure(killed="Train worker rank 1 (SIGKILL)", requests_failed=None, jobs_lost=0, jobs_duplicated=0,
                 resumed_from=resumes[0], recovery_s=round(resumed_at - killed_at - 3.0, 1))
