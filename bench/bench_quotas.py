"""Quota benchmarks (issue 13, item 4): how far past its GPU-hour budget a real run goes before it stops, and how many
of N concurrent submits with room for one are accepted.

    .venv/bin/python bench/bench_quotas.py [--budget-gpu-s 7.2] [--steps 70] [--database-url URL] [--json]

The run is the real trainer on the `tiny` preset in this process (InlineRunner), a CPU job (one capacity unit, so
wall seconds are its "GPU-seconds"), with the default heartbeat (2 s). Figures go into BENCHMARKS.md with the
machine named. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from cluster.config import ControlPlaneSettings  # noqa: E402
from cluster.db import UsageRecord  # noqa: E402
from cluster.runner import InlineRunner  # noqa: E402
from cluster.scheduler import Scheduler  # noqa: E402
from cluster.schemas import Quotas  # noqa: E402
from cluster.service import ControlPlane, QuotaExceeded  # noqa: E402


def _png(color=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(tenant: str, steps: int) -> dict:
    return {"tenant": tenant, "name": "pets", "base_model": "tiny",
            "subjects": [{"token": "<s1>", "class_word": "cat", "images": ["a.png"]}],
            "train": {"resolution": 64, "steps": steps, "checkpoint_every": 50, "log_every": 1},
            "resources": {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}}


def bench_budget_overrun(plane: ControlPlane, budget_gpu_s: float, steps: int, timeout_s: float = 600) -> dict:
    plane.create_tenant("spender", Quotas(gpu_hours_per_30d=budget_gpu_s / 3600.0))
    job = plane.submit("spender", _spec("spender", steps), {"a.png": _png()})
    scheduler = Scheduler(plane.settings, InlineRunner(), capacity_gpus=1)
    start = time.time()
    while time.time() - start < timeout_s:
        scheduler.tick()
        view = plane.get_job("spender", job.id)
        if view.state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    for run in scheduler.handles.values():  # a run ended by the scheduler stops at its next step
        run.thread.join(timeout_s)
    with plane.db.read() as session:
        used = float(session.execute(select(func.sum(UsageRecord.gpu_seconds)).where(UsageRecord.job_id == job.id)).scalar_one() or 0)
    return {"budget_gpu_s": budget_gpu_s, "used_gpu_s": used, "overrun_gpu_s": used - budget_gpu_s,
            "ratio": used / budget_gpu_s, "state": view.state, "error": view.error,
            "step": view.progress.step, "checkpoint_step": view.progress.checkpoint_step}


def bench_concurrent_submits(plane: ControlPlane, n: int = 10) -> dict:
    image = _png((10, 200, 10))
    plane.create_tenant("racer", Quotas(max_stored_bytes=len(image) * 3 // 2))
    barrier = threading.Barrier(n)
    results: list[str] = []

    def submit():
        barrier.wait()
        try:
            plane.submit("racer", _spec("racer", 4), {"a.png": image})
            results.append("accepted")
        except QuotaExceeded:
            results.append("429")

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"submits": n, "accepted": results.count("accepted"), "refused_429": results.count("429"),
            "jobs_stored": len(plane.list_jobs("racer"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gpu-s", type=float, default=7.2)
    parser.add_argument("--steps", type=int, default=70, help="under budget / (0.1 GPU-s per step), or the submit is refused")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ct2i-bench-quotas-") as tmp:
        settings = ControlPlaneSettings(home=Path(tmp), database_url=args.database_url or f"sqlite:///{tmp}/ct2i.db",
                                        artifacts_uri=f"{tmp}/artifacts", capacity_gpus=1)
        plane = ControlPlane.open(settings)
        figures = {"concurrent_submits": bench_concurrent_submits(plane),
                   "budget_overrun": bench_budget_overrun(plane, args.budget_gpu_s, args.steps)}
    print(json.dumps(figures, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
