"""The Ray driver of the head-restart test (tests/faults/test_gcs_ft.py), run as its own short-lived process.

`setup` starts what a platform's operator starts once: the detached scheduler actor (with the fake trainer in
Ray tasks, paced by a file gate) and the Serve application (`serve.app.build_app`, tiny base) behind Serve's HTTP
proxy. `probe` only looks: the scheduler actor by its name (never creating it), its status, and Serve's
application status. Each prints one JSON line and exits; nothing is re-created after the head restart, so what is
found then came back from the GCS's Redis.

A process of its own because the head binds to loopback for real (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
Ray is imported): the pytest process may have imported Ray already without it, and would then look for its raylet
on the machine's routable address.
"""

from __future__ import annotations

import json
import sys
import time


def _connect(address: str) -> None:
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)


def setup(args: dict) -> dict:
    import ray
    from ray import serve

    from cluster.config import ControlPlaneSettings
    from cluster.runner import RayTaskRunner
    from ct2i.scheduler import get_or_create_scheduler
    from serve.app import build_app
    from tests.cluster.fake_trainer import FakeTrainer, FileGate

    _connect(args["address"])
    settings = ControlPlaneSettings(**args["settings"])
    actor = get_or_create_scheduler(settings, runner=RayTaskRunner(FakeTrainer(FileGate(args["gate"]))))
    serve.start(http_options={"host": "127.0.0.1", "port": args["http_port"]})
    serve.run(build_app(settings, batch_wait_s=0.02,
                        generator_options={"num_replicas": 1, "health_check_timeout_s": 120,
                                           "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}},
                        ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}),
              name=args["app"], route_prefix="/")
    return {"scheduler_actor_id": actor._actor_id.hex(), "scheduler": ray.get(actor.status.remote()),
            "serve": _serve_status(args["app"])}


def _serve_status(app: str) -> dict:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {"app": None}
    return {"app": str(getattr(status.status, "value", status.status)),
            "deployments": {name: {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
                            for name, d in status.deployments.items()}}


def probe(args: dict) -> dict:
    import ray

    _connect(args["address"])
    started = time.monotonic()
    actor = None
    while actor is None and time.monotonic() - started < args.get("wait_s", 60):
        try:
            actor = ray.get_actor(args["scheduler_name"], namespace=args["namespace"])
        except ValueError:
            time.sleep(0.5)
    if actor is None:
        return {"scheduler_actor_id": None, "serve": _serve_status(args["app"])}
    return {"scheduler_actor_id": actor._actor_id.hex(), "scheduler": ray.get(actor.status.remote(), timeout=120),
            "serve": _serve_status(args["app"])}


if __name__ == "__main__":
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    result = {"setup": setup, "probe": probe}[command](payload)
    print("RESULT " + json.dumps(result, default=str), flush=True)
