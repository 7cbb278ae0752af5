"""The scheduler actor of a Ray cluster, with the runner its settings name.

`settings.scheduler.runner` (`CT2I_SCHEDULER__RUNNER`) decides how admitted jobs run, and the actor reads it
itself: every driver (`ct2i serve`, `ct2i submit`, `python -m ct2i.job`, the demo, the Serve ingress) calls
`get_or_create_scheduler(settings)` with no runner of its own, so whoever starts first, jobs run the same way.
A driver whose settings name another runner than the running actor's gets `SchedulerConflict`, not a
silently different platform.
"""

from __future__ import annotations

from cluster.config import ControlPlaneSettings, RunnerKind
from cluster.runner import InlineRunner, RayTaskRunner, Runner
from cluster.scheduler import SchedulerLoop, find_scheduler


class SchedulerConflict(RuntimeError):
    pass


def runner_for(kind: RunnerKind) -> Runner:
    if kind == "ray_train":
        from tune.runner import ray_train_runner

        return ray_train_runner()
    if kind == "ray_task":
        return RayTaskRunner()
    return InlineRunner()


class SchedulerActor(SchedulerLoop):
    """The detached, named actor: a `SchedulerLoop` whose runner is the one its settings name.

    `runner` is for tests and embedders that bring their own train function; the actor then reports that
    runner's kind, and `get_or_create_scheduler` refuses to pair it with settings naming another."""

    def __init__(self, settings: ControlPlaneSettings, runner: Runner | None = None):
        super().__init__(settings, runner or runner_for(settings.scheduler.runner))


def get_or_create_scheduler(settings: ControlPlaneSettings | None = None, *, runner: Runner | None = None):
    """The scheduler actor of this Ray cluster, created if missing. Needs `ray.init()` (or RAY_ADDRESS) first."""
    import ray

    settings = settings or ControlPlaneSettings()
    actor_class = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1)(SchedulerActor)
    handle = actor_class.options(name=settings.scheduler_name, namespace=settings.ray_namespace, lifetime="detached",
                                 get_if_exists=True).remote(settings, runner)
    running = ray.get(handle.status.remote())["runner"]
    wanted = runner.kind if runner is not None else settings.scheduler.runner
    if running != wanted:
        raise SchedulerConflict(f"the scheduler {settings.scheduler_name!r} runs jobs with {running!r}, but these settings "
                                f"name {wanted!r} (CT2I_SCHEDULER__RUNNER); stop it or use the same setting everywhere")
    return handle


__all__ = ["SchedulerActor", "SchedulerConflict", "find_scheduler", "get_or_create_scheduler", "runner_for"]
