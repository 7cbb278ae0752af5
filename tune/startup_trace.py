"""Start-up phase marks for `bench/bench_startup.py`: wall-clock timestamps from every process of a run.

A process whose environment names `CT2I_STARTUP_TRACE` (a file path; the bench sets it in the Ray job's
runtime env so the driver task, the Train controller and the workers all inherit it) appends one JSON line
per mark. Unset, `mark` does nothing: the cost in production is one dictionary look-up.
"""

from __future__ import annotations

import json
import os
import time

TRACE_ENV = "CT2I_STARTUP_TRACE"


def mark(phase: str, **extra) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"phase": phase, "t": time.time(), "pid": os.getpid(), **extra})
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def process_started() -> float:
    """This process's start time (epoch seconds), from /proc: the worker's own clock starts before Python."""
    import psutil

    return psutil.Process().create_time()
