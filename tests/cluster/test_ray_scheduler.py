"""The detached scheduler actor on the session's Ray: whoever starts it, it runs the runner its settings name; a
tiny-preset job end to end through `ct2i submit`. Its restarts (the actor killed, Ray itself restarted) are
fault runs: tests/faults/test_scheduler_restarts.py (`make cluster-faults`)."""

from __future__ import annotations

import pytest

from ct2i.scheduler import SchedulerConflict, find_scheduler, get_or_create_scheduler
from tests.cluster.conftest import with_timing

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
def ray_settings(settings):
    timed = with_timing(settings, tick_seconds=0.2, heartbeat_seconds=0.3, lease_seconds=3.0, progress_write_seconds=0.0)
    return timed.model_copy(update={"capacity_gpus": 2, "scheduler_name": f"ct2i-scheduler-{id(settings)}"})


@pytest.fixture
def kill_scheduler_after(ray_settings):
    yield
    import ray

    actor = find_scheduler(ray_settings)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def test_the_runner_is_the_settings_whoever_starts_the_scheduler(ray_settings, plane, kill_scheduler_after):
    """`ct2i serve`, `ct2i submit`, `python -m ct2i.job` and the demo all call get_or_create_scheduler(settings)
    with no runner of their own: the first one's settings and the second one's agree, so the actor they share
    runs jobs with the runner the settings name; settings that name another runner are refused, not ignored."""
    import ray

    first = get_or_create_scheduler(ray_settings)  # as `ct2i serve` starts it
    again = get_or_create_scheduler(ray_settings)  # as a later `ray job submit` driver finds it
    assert first._actor_id == again._actor_id == find_scheduler(ray_settings)._actor_id
    status = ray.get(first.status.remote())
    assert status["runner"] == "ray_train" and status["capacity_gpus"] == 2
    other = ray_settings.model_copy(update={"scheduler": ray_settings.scheduler.model_copy(update={"runner": "ray_task"})})
    with pytest.raises(SchedulerConflict, match="ray_train"):
        get_or_create_scheduler(other)


def test_ct2i_submit_tiny_preset_end_to_end(tmp_path, monkeypatch, capsys):
    """`ct2i submit --wait` with the real method-core trainer on the tiny preset (SQLite; the PostgreSQL path of
    the same code is covered by the fault suite's restart tests, tests/faults), its jobs run in Ray tasks as the settings say."""
    import json

    import ray

    from causalt2i.adapter import load_adapter
    from causalt2i.data.synthetic import write_synthetic_spec
    from cluster.config import ControlPlaneSettings
    from ct2i.cli import main

    monkeypatch.setenv("CT2I_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CT2I_SCHEDULER__RUNNER", "ray_task")
    monkeypatch.setenv("CT2I_SCHEDULER_NAME", "ct2i-scheduler-e2e")
    monkeypatch.delenv("CT2I_DATABASE_URL", raising=False)
    monkeypatch.delenv("CT2I_ARTIFACTS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec_path = write_synthetic_spec(tmp_path / "spec", tenant="demo", name="e2e", resolution=64, steps=4,
                                     n_subjects=2, images_per_subject=2, size=64, gpus_per_worker=0)
    assert main(["tenants", "create", "demo"]) == 0
    try:
        code = main(["submit", str(spec_path), "--wait", "--json", "--poll-seconds", "0.5"])
        out, err = capsys.readouterr()
        assert code == 0, err
        job = json.loads(out[out.index("{"):])
        assert job["state"] == "succeeded" and job["progress"]["step"] == 4 and job["attempts"] == 1
        assert main(["adapters", "list", "--json"]) == 0
        adapters = json.loads(capsys.readouterr().out)
        assert [(a["name"], a["version"], a["job_id"]) for a in adapters] == [("e2e", 1, job["id"])]
        assert adapters[0]["base_model"] == "tiny" and len(adapters[0]["sha256"]) == 64
        from cluster.service import ControlPlane

        plane = ControlPlane.open(ControlPlaneSettings())
        assert plane.usage("demo").gpu_seconds_30d > 0
        local = tmp_path / "fetched"
        assert "uri" not in adapters[0]  # an id, never a storage path
        stored = plane.get_adapter(None, adapters[0]["id"])
        plane.store.fetch_dir("demo", plane.store.parse_uri(stored.uri, "demo"), local)
        assert load_adapter(local).manifest.name == "e2e"
        events = [e.message for e in plane.job_events(None, job["id"])]
        assert any(m.startswith("diagnostics at step") for m in events)  # the trainer's on_diagnostics reached the job
    finally:
        actor = find_scheduler(ControlPlaneSettings())
        if actor is not None:
            ray.kill(actor, no_restart=True)
