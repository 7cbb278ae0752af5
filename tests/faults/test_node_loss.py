"""A Ray node lost mid-tune: every process of the worker node holding a tune's Train worker is SIGKILLed (by PID)
at step k, and the run resumes on the surviving head from the last checkpoint persisted under its shared
`storage_path`.

The path is the production one: the control plane's `Scheduler` (ticking in this driver, on the head) with
`tune.runner.ray_train_runner()`, a Ray Train run of the tiny preset under DeepSpeed ZeRO-2 (1 worker, CPU).
The attempt's driver task and the Train controller run beside the scheduler (the head); a squatter holding
the head's CPUs makes Ray place the Train worker on the worker node (the one with the `worker_node` resource,
checked from its process tree), and is released just before the kill, so the head has room for the restart.

Figure (asserted): one worker-group restart within the same attempt (attempts 1), from the last checkpoint
recorded before it (k ≤ it); checkpoints 2, 4, 6, 8 each recorded once; the job `succeeded` with one adapter
whose tensors equal an uninterrupted run's within the suite's exact-resume tolerance (atol 1e-6, rtol 0, as in
tests/causalt2i/test_trainer_resume.py); the run's checkpoints are under the shared `storage_path`. Jobs lost
0, duplicated 0; the seconds from the kill to the resume event are reported (not bounded: they are Ray's
node-death detection and a worker start on this machine).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from cluster.config import ControlPlaneSettings
from cluster.db import Adapter, JobEvent
from cluster.scheduler import Scheduler
from cluster.service import ControlPlane
from tests.faults.conftest import actors_created
from tests.tune.conftest import two_subject_spec
from tune.runner import ray_train_runner
from tune.train_run import storage_path

pytestmark = [pytest.mark.timeout(1800)]

STEPS, EVERY, KILL_AT = 8, 2, 2
ATOL = 1e-6  # the exact-resume tolerance (tests/causalt2i/test_trainer_resume.py)


class Squatter:
    def ready(self) -> bool:
        return True


def _settings(root: Path) -> ControlPlaneSettings:
    return ControlPlaneSettings(home=root / "home", database_url=f"sqlite:///{root / 'ct2i.db'}",
                                artifacts_uri=str(root / "artifacts"), capacity_gpus=2,
                                scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.5, "lease_seconds": 120.0,
                                           "progress_write_seconds": 0.0})


class Ticking:
    """The scheduler ticking in a thread of this driver, as `SchedulerLoop` does in the detached actor."""

    def __init__(self, scheduler: Scheduler, every: float = 0.3):
        self.scheduler, self.every = scheduler, every
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.scheduler.tick()
            except Exception as err:  # a tick racing the node's death (e.g. a GCS call): the next one retries
                self.errors.append(f"{type(err).__name__}: {err}")

    def __enter__(self) -> "Ticking":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        self.scheduler.close()


def _wait(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _ended(plane: ControlPlane, job_id: str) -> bool:
    return plane.get_job(None, job_id).state in ("succeeded", "failed", "cancelled")


def _adapter_tensors(plane: ControlPlane, tenant: str, adapter_id: str, into: Path) -> dict[str, torch.Tensor]:
    plane.store.fetch_dir(tenant, ("adapters", adapter_id), into)  # sha256-checked
    return load_file(str(into / "adapter.safetensors"))


def _train_worker_pids(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_lost_worker_node_resumes_the_tune_on_the_head_from_shared_checkpoints(two_nodes, tmp_path, fault_figure):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    settings = _settings(two_nodes.shared)
    plane = ControlPlane.open(settings)
    plane.create_tenant("acme")
    head = two_nodes.nodes["head"].node_id

    # The uninterrupted run the resumed one must equal (placed wherever Ray likes; both nodes are alive).
    spec, images = two_subject_spec("acme", "cat-dog", steps=STEPS, checkpoint_every=EVERY, num_workers=1)
    reference = plane.submit("acme", spec, images)
    watchers_before = actors_created("PreemptionWatcher")
    with Ticking(Scheduler(settings, ray_train_runner())):
        _wait(lambda: _ended(plane, reference.id), 900, "the uninterrupted run")
    reference = plane.get_job("acme", reference.id)
    assert reference.state == "succeeded", reference.error
    # Two nodes alive (scheduler.preemption_watcher `auto`): the run keeps Ray Train's preemption watcher, so a
    # drained worker node would cost a restart outside max_failures (tests/faults/test_ray_train_previews.py: none
    # on one node).
    assert actors_created("PreemptionWatcher") == watchers_before + 1
    from cluster.runner import LAUNCHER_NAME

    # The actor that owns every run sits on the head: on the worker node it would take the run with it.
    launcher = ray.get_actor(LAUNCHER_NAME, namespace=settings.ray_namespace)
    assert ray._private.state.actors(launcher._actor_id.hex())["Address"]["NodeID"] == head, "the launcher is not on the head"

    # The head's CPUs taken, the tune's one Train worker can only go to the worker node.
    squatter = ray.remote(num_cpus=two_nodes.cpus_per_node)(Squatter).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(squatter.ready.remote(), timeout=300)
    job = plane.submit("acme", spec, images)
    with Ticking(Scheduler(settings, ray_train_runner())) as ticking:
        _wait(lambda: (plane.get_job("acme", job.id).progress.step or 0) >= KILL_AT, 900, f"step {KILL_AT}", every=0.1)
        worker_pids = two_nodes.nodes["worker"].pids()
        assert _train_worker_pids(worker_pids), "the Train worker is not a process of the worker node"
        step_at_kill = plane.get_job("acme", job.id).progress.step
        ray.kill(squatter)  # the head gets its CPUs back: the only node left to restart on
        killed_at = time.time()
        killed = two_nodes.kill_node("worker")
        _wait(lambda: _ended(plane, job.id), 900, "the resumed run")
    assert [n["NodeID"] for n in two_nodes.alive_nodes()] == [head], "the worker node is still listed alive"

    done = plane.get_job("acme", job.id)
    assert done.state == "succeeded", done.error
    assert done.attempts == 1, "the attempt was lost with the node (its driver should run on the head)"
    events = plane.job_events("acme", job.id)
    checkpoints = [e.data["step"] for e in events if e.message.startswith("checkpoint at step")]
    resumes = [e for e in events if e.data and "resumed_from" in e.data]
    assert len(resumes) == 1, [e.message for e in events]
    resumed_from, resumed_at = resumes[0].data["resumed_from"], resumes[0].at
    before_resume = [e.data["step"] for e in events if e.message.startswith("checkpoint at step") and e.at <= resumed_at]
    assert resumed_from >= KILL_AT and resumed_from == max(before_resume), (resumed_from, before_resume)
    assert resumed_at > killed_at
    assert checkpoints == list(range(EVERY, STEPS + 1, EVERY)), f"a checkpoint step was recorded twice or skipped: {checkpoints}"
    assert done.progress.step == STEPS and done.progress.checkpoint_step == STEPS
    with plane.db.read() as session:
        assert session.execute(select(func.count()).select_from(Adapter).where(Adapter.job_id == job.id)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job.id, JobEvent.state == "succeeded")).scalar_one() == 1

    # Ray Train persisted the checkpoints under the run's storage_path in the shared folder (the RWX volume).
    run_storage = Path(storage_path(settings.artifacts_uri)) / f"acme--{job.id}"
    assert run_storage.is_relative_to(two_nodes.shared)
    kept = sorted(p.name for p in run_storage.glob("checkpoint_*"))
    assert kept, f"no checkpoint under {run_storage}"

    expected = _adapter_tensors(plane, "acme", reference.adapter_id, tmp_path / "reference")
    got = _adapter_tensors(plane, "acme", done.adapter_id, tmp_path / "resumed")
    assert set(got) == set(expected)
    worst = 0.0
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=ATOL), name
        worst = max(worst, float((got[name].float() - tensor.float()).abs().max()))
    fault_figure(killed=f"worker node: {len(killed)} processes (SIGKILL) at step {step_at_kill}", requests_failed=None,
                 jobs_lost=0, jobs_duplicated=0, resumed_from=resumed_from, attempts=done.attempts,
                 max_abs_diff_vs_uninterrupted=worst, recovery_s=round(resumed_at - killed_at, 1),
                 tick_errors=len(ticking.errors))
