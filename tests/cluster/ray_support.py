"""Starting and stopping a local Ray for the control-plane tests (num_cpus=2, no dashboard, no auth)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_local_ray() -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's workers inherit this environment: they must import `cluster` and `tests.cluster.fake_trainer`.
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def stop_local_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
