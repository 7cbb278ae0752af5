"""`ct2i serve`: the whole platform in the foreground on this machine (or on the Ray cluster at RAY_ADDRESS).

It starts (or joins) Ray, the control plane's scheduler actor, and the Serve application, prints where
everything is, and waits. SIGINT or SIGTERM shuts Serve down (and Ray, when it started it) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_NAME = "ct2i"


def add_serve_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the platform (generate API, control-plane API, web page) until interrupted",
        description="Start Ray (or join RAY_ADDRESS / --address), the tuning scheduler and the Serve application, "
                    "then stay in the foreground until Ctrl-C or SIGTERM. Models: CT2I_BASE_MODEL (default tiny).")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="an existing Ray cluster (default: RAY_ADDRESS; unset = start a local one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.set_defaults(func=cmd_serve)


class _StopSignals:
    """SIGINT/SIGTERM caught from construction on (so one that arrives while the app is still starting is not
    lost to Ray's own handler); `wait` returns the first one and restores the previous handlers."""

    def __init__(self):
        self.stop = threading.Event()
        self.received: list[int] = []
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, _frame):
        self.received.append(signum)
        self.stop.set()

    def wait(self) -> int:
        try:
            while not self.stop.wait(0.5):
                pass
        finally:
            for sig, old in self.previous.items():
                signal.signal(sig, old)
        return self.received[0]


def cmd_serve(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print(f"ct2i: error: --port: must be within 1..65535, got {args.port}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from cluster.config import ControlPlaneSettings
    from cluster.scheduler import get_or_create_scheduler
    from cluster.service import ControlPlane
    from serve.app import build_app

    settings = ControlPlaneSettings.from_env()
    ControlPlane.open(settings)  # creates (or migrates) the database before any replica opens it
    started_ray = not args.address
    if started_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a single-machine cluster listening on loopback
        # A busy laptop can take longer than Serve's 5 s to start the HTTP proxy, which Serve then kills.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=args.address)
    exit_code = 0
    try:
        get_or_create_scheduler(settings)
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        # On a CPU-only box the replicas take fractions of a CPU, so a tuning task (one CPU) still fits beside them.
        generator_resources = {"num_cpus": 1, "num_gpus": 1} if has_gpus else {"num_cpus": 0.5, "num_gpus": 0}
        serve.start(http_options={"host": args.host, "port": args.port})
        stop_signals = _StopSignals()  # after ray.init, whose core worker installs its own handlers
        serve.run(build_app(settings, generator_options={"ray_actor_options": generator_resources},
                            ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}),
                  name=APP_NAME, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"ct2i serve: {url}  (web page {url}/, API docs {url}/docs, health {url}/healthz)", flush=True)
        print(f"ct2i serve: data {settings.home}, database {settings.database_url}, artifacts {settings.artifacts_uri}, "
              f"base model {os.environ.get('CT2I_BASE_MODEL') or 'tiny'}", flush=True)
        print("ct2i serve: Ctrl-C or SIGTERM stops it", flush=True)
        signum = stop_signals.wait()
        print(f"ct2i serve: {signal.Signals(signum).name}, shutting down", flush=True)
    except Exception as err:
        print(f"ct2i: error: {type(err).__name__}: {err}", file=sys.stderr)
        exit_code = 1
    finally:
        started = time.perf_counter()
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
        print(f"ct2i serve: stopped in {time.perf_counter() - started:.1f} s", flush=True)
    return exit_code
