"""What it costs to start an attempt's driver in a Ray task versus in a fresh detached actor per attempt.

Why it matters: a run must outlive the scheduler that started it (issue 16), and there were two ways to get
that. A detached actor per attempt has no owner to die with, but every actor is a new worker process that pays
the driver's imports again; a task reuses a warm worker of the same job, so `cluster.runner` submits the tasks
from a detached launcher actor instead (`_AttemptLauncher`). This bench measures both side by side in one Ray
session: the seconds from submission to the first answer of a body that imports what an attempt imports first
(torch, `cluster.runner`), three starts each, alternating.

    .venv/bin/python bench/bench_attempt_start.py [--starts 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def attempt_body() -> int:
    import torch  # noqa: F401  (what a trainer imports first)

    import cluster.runner  # noqa: F401

    return os.getpid()


class Host:
    def run(self) -> int:
        return attempt_body()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=3, help="starts per kind and round (default 3)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="bench-attempt-start")
    task = ray.remote(attempt_body).options(num_cpus=1)
    host = ray.remote(Host)
    seconds: dict[str, list[float]] = {"task (warm worker)": [], "detached actor per attempt": []}
    ray.get(task.remote())  # the first task's worker start is paid once, by either design's first attempt
    for round_ in range(2):
        for kind in seconds:
            for i in range(args.starts):
                started = time.monotonic()
                if kind.startswith("task"):
                    ray.get(task.remote())
                else:
                    actor = host.options(num_cpus=1, lifetime="detached", name=f"bench-host-{round_}-{i}").remote()
                    ray.get(actor.run.remote())
                    ray.kill(actor)
                seconds[kind].append(time.monotonic() - started)
    ray.shutdown()
    task_s = statistics.median(seconds["task (warm worker)"])
    actor_s = statistics.median(seconds["detached actor per attempt"])
    print("| start of an attempt's driver | median s | all starts (s) |")
    print("| --- | --- | --- |")
    for kind, values in seconds.items():
        print(f"| {kind} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"\nactor / task: {actor_s / max(task_s, 1e-3):.0f}x ({actor_s - task_s:.1f} s more per attempt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
