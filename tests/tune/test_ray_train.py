"""Ray Train runs of CausalT2I under DeepSpeed ZeRO-2 (CPU, gloo), through the control plane."""

from __future__ import annotations

import pytest
import torch

from causalt2i.adapter import AdapterHost, load_adapter
from causalt2i.models import load_sdxl
from cluster.scheduler import Scheduler
from tests.tune.conftest import run_until_done, two_subject_spec
from tune.runner import ray_train_runner

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _events(plane, job):
    return plane.job_events(job.tenant, job.id)


def test_two_workers_with_a_killed_worker_resume_and_publish_an_adapter_that_applies(local_ray, settings, plane, tmp_path):
    plane.create_tenant("acme")
    spec, images = two_subject_spec("acme", "cat-dog", steps=6, checkpoint_every=2, num_workers=2)
    job = plane.submit("acme", spec, images)
    marker = tmp_path / "fault-fired"
    runner = ray_train_runner(fault={"rank": 1, "step": 3, "marker": str(marker), "delay_s": 3.0})
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
