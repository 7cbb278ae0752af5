"""Where a tiny tune's start-up goes: admission to step 1 of a real Ray Train run, phase by phase.

One Ray session (2 CPUs), a SQLite control plane in a temp folder, and the scheduler's `ray_train`
runner — the production path: the attempt task, the `_fit` driver task, Ray Train's controller and its
worker group (1 worker, CPU, gloo, DeepSpeed ZeRO-2). The tune is 2 steps with a checkpoint at step 2.
Every process of the run appends timestamped marks (`tune.startup_trace`, switched on through the job's
runtime env); the table gives each mark's time since admission (the scheduler tick that admits the job)
and since the mark before it. `--runs 2` (the default) also shows a second run in the same Ray session,
as the next job on a running cluster would see it.

`--watcher` picks `scheduler.preemption_watcher` (default `auto`: off on this one-node session); `--watcher
both` alternates `on` and `auto` over the runs after the first, in the same Ray session, and ends with both
modes' times to step 1 side by side.

    .venv/bin/python bench/bench_startup.py [--runs 2] [--steps 2] [--watcher auto|on|off|both]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

TERMINAL = ("succeeded", "failed", "cancelled")


def _png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (size, size), (240, 240, 240))
    image.paste(Image.new("RGB", (size // 2, size // 2), color), (size // 4, size // 4))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(name: str, steps: int) -> tuple[dict, dict[str, bytes]]:
    spec = {
        "tenant": "bench", "name": name, "base_model": "tiny",
        "subjects": [{"token": "<s1>", "class_word": "cat", "images": ["cat1.png", "cat2.png"]},
                     {"token": "<v1>", "class_word": "dog", "images": ["dog1.png", "dog2.png"]}],
        "train": {"resolution": 64, "steps": steps, "checkpoint_every": steps},
        "resources": {"num_workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 1},
    }
    images = {"cat1.png": _png((200, 60, 40)), "cat2.png": _png((190, 70, 50)),
              "dog1.png": _png((40, 60, 200)), "dog2.png": _png((50, 80, 190))}
    return spec, images


def _read_marks(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_run(scheduler, plane, trace: Path, name: str, steps: int, timeout_s: float) -> list[tuple[str, float]]:
    from tune.startup_trace import mark

    trace.write_text("")
    job = plane.submit("bench", *_spec(name, steps))
    mark("driver: admission (scheduler tick)")
    deadline = time.time() + timeout_s
    state = None
    while time.time() < deadline:
        scheduler.tick()
        state = plane.get_job("bench", job.id)
        if state.state in TERMINAL:
            break
        time.sleep(0.2)
    mark("driver: job terminal seen")
    if state is None or state.state != "succeeded":
        raise SystemExit(f"the run did not succeed: {state.state if state else None} {state.error if state else ''}")
    marks = _read_marks(trace)
    events = [(m["phase"], m["t"]) for m in marks]
    started = [m for m in marks if "process_started" in m]
    if started:
        events.append(("worker: process started (psutil)", started[0]["process_started"]))
    return sorted(events, key=lambda e: e[1])


def _since_admission(events: list[tuple[str, float]]) -> list[tuple[str, float]]:
    origin = next(t for phase, t in events if phase.startswith("driver: admission"))
    return [(phase, t - origin) for phase, t in events]


def print_table(title: str, events: list[tuple[str, float]]) -> None:
    origin = next(t for phase, t in events if phase.startswith("driver: admission"))
    print(f"\n{title}\n\n| phase (mark) | since admission, s | since previous, s |\n|---|---|---|")
    previous = origin
    for phase, t in events:
        print(f"| {phase} | {t - origin:.2f} | {t - previous:.2f} |")
        previous = t
    step1 = [t for phase, t in events if phase == "worker: step 1 done"]
    if step1:
        print(f"\n**admission to step 1: {step1[0] - origin:.1f} s**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs in one Ray session (the first is cold)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--watcher", choices=("auto", "on", "off", "both"), default="auto",
                        help="scheduler.preemption_watcher; `both` alternates on/auto after the cold run")
    args = parser.parse_args()

    import ray

    from cluster.config import ControlPlaneSettings
    from cluster.scheduler import Scheduler
    from cluster.service import ControlPlane
    from tune.runner import ray_train_runner
    from tune.startup_trace import TRACE_ENV

    with tempfile.TemporaryDirectory(prefix="ct2i-bench-startup-") as tmp:
        trace = Path(tmp) / "marks.jsonl"
        os.environ[TRACE_ENV] = str(trace)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {TRACE_ENV: str(trace)}})
        print(f"ray.init: {time.perf_counter() - started:.1f} s (before admission, not counted)")
        try:
            settings = ControlPlaneSettings(home=Path(tmp) / "home", database_url=f"sqlite:///{Path(tmp) / 'ct2i.db'}",
                                            artifacts_uri=str(Path(tmp) / "artifacts"), capacity_gpus=2,
                                            scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.5,
                                                       "lease_seconds": 60.0, "progress_write_seconds": 0.0})
            plane = ControlPlane.open(settings)
            plane.create_tenant("bench")
            modes = ["on", "auto"] if args.watcher == "both" else [args.watcher]
            schedulers = {mode: Scheduler(settings.model_copy(update={"scheduler": settings.scheduler.model_copy(
                update={"preemption_watcher": mode})}), ray_train_runner()) for mode in modes}
            load = os.getloadavg()
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {load[0]:.1f} at start")
            to_step1: dict[str, list[float]] = {mode: [] for mode in modes}
            for index in range(args.runs):
                mode = modes[(index - 1) % len(modes)] if index else modes[-1]
                events = one_run(schedulers[mode], plane, trace, f"startup-{index}", args.steps, args.timeout)
                print_table(f"run {index + 1} ({'cold Ray session' if index == 0 else 'same Ray session'}, "
                            f"preemption watcher {mode})", events)
                if index:
                    to_step1[mode].extend(t for phase, t in _since_admission(events) if phase == "worker: step 1 done")
            print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
            print("\n| preemption watcher | warm runs: admission to step 1, s |\n|---|---|")
            for mode, seconds in to_step1.items():
                print(f"| {mode} | {', '.join(f'{s:.1f}' for s in seconds)} |")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
