"""`ct2i serve`: the whole platform in the foreground on this machine (or on the Ray cluster at RAY_ADDRESS).

It starts (or joins) Ray, the control plane's scheduler actor (with the runner the settings name:
`CT2I_SCHEDULER__RUNNER`, Ray Train by default), and the Serve application, prints where everything is, and
waits. SIGINT or SIGTERM shuts Serve down (and Ray, when it started it) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_NAME = "ct2i"


def settings_beside_serve(settings, cluster_resources: dict, generator_resources: dict, ingress_resources: dict):
    """The settings of a `ct2i serve` that started its own Ray: tunings get the capacity its Serve replicas leave.

    Without it the scheduler counts the generator's GPU (on a CPU box, the replicas' CPUs) as free, admits a job into
    it, and that job's workers wait for a device that never frees until the worker-start timeout fails them. A
    configured `capacity_gpus` (`CT2I_CAPACITY_GPUS`) is the operator's word and stays."""
    import math

    if settings.capacity_gpus is not None:
        return settings
    unit, key = ("GPU", "num_gpus") if cluster_resources.get("GPU", 0) >= 1 else ("CPU", "num_cpus")
    held = generator_resources.get(key, 0) + ingress_resources.get(key, 0)
    left = math.floor(cluster_resources.get(unit, 0) - held + 1e-9)
    return settings.model_copy(update={"capacity_gpus": float(max(left, 1))})


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


def local_ray_auth() -> str:
    """Keep Ray's token auth on for a Ray this command starts (Ray 2.60's default for a local cluster, made
    explicit so it does not hang on the version); `RAY_AUTH_MODE=disabled` set by the operator (the tests) is
    honoured, loudly. Ray finds or makes the token: RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (created on first start); drivers on this machine read the same place. Returns a line
    saying which."""
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        # Only before Ray is imported: Ray reads its config once, and a GCS started with the variable set while
        # this process still thinks auth is off would find no token (Ray makes it only when it sees token mode).
        # Once imported, Ray's own default for a new local cluster (token, since 2.59) applies.
        os.environ["RAY_AUTH_MODE"] = "token"
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode != "token":
        print(f"ct2i: WARNING: Ray token auth is off (RAY_AUTH_MODE={mode}): any process that reaches Ray's "
              "ports can run code on it. Only the test suite should do this.", file=sys.stderr, flush=True)
        return f"Ray token auth OFF (RAY_AUTH_MODE={mode})"
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = os.environ["RAY_AUTH_TOKEN_PATH"]
    else:
        source = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return f"Ray token auth on (token: {source})"


def restrict_token_file() -> None:
    """Ray writes ~/.ray/auth_token readable by everyone on the machine (0644); the token is the cluster's only
    credential, so make it the owner's alone."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and os.path.isfile(path):
        os.chmod(path, 0o600)


LOCAL_ONLY_RAY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray 2.60 turns a loopback node address into the machine's routable one (`services.resolve_ip_for_localhost`),
so `ray.init(_node_ip_address="127.0.0.1")` alone still puts the GCS, raylet, agents and workers on every
interface. With this variable at 0 (Ray's switch for a cluster of one machine, read once when Ray is imported)
the loopback address stands, and every one of them binds it."""


def local_ray_binding(settings) -> dict:
    """`ray.init` arguments that bind a local Ray's GCS, raylet, object manager and agents to
    `settings.ray_bind_host` (127.0.0.1 unless the operator sets CT2I_RAY_BIND_HOST). Call it before `import ray`:
    for a loopback address it sets LOCAL_ONLY_RAY_VARIABLE, which Ray and the processes it starts read at import.
    Such a Ray takes no other nodes; an operator who wants them sets CT2I_RAY_BIND_HOST to the host's address."""
    import ipaddress

    host = settings.ray_bind_host
    if ipaddress.ip_address(host).is_loopback:
        if "ray" in sys.modules and os.environ.get(LOCAL_ONLY_RAY_VARIABLE) != "0":
            raise RuntimeError(f"local_ray_binding must run before `import ray`: Ray reads {LOCAL_ONLY_RAY_VARIABLE} "
                               "once, and without it binds beyond loopback")
        os.environ[LOCAL_ONLY_RAY_VARIABLE] = "0"
    return {"_node_ip_address": host}


def loopback_driver_environment(address: str | None) -> None:
    """For a driver about to connect (call before `import ray`): when the cluster it connects to is on loopback,
    set LOCAL_ONLY_RAY_VARIABLE, as the cluster's own processes have it. Without it Ray 2.60 rewrites the
    loopback address to the routable one (`services.resolve_ip_for_localhost`) and waits for a GCS that is not
    there. `address` is what `ray.init` gets: "host:port", "ray://...", "auto" or None (the local cluster, whose
    address Ray records in RAY_TMPDIR/ray/ray_current_cluster, read here the way Ray reads it)."""
    import ipaddress

    if LOCAL_ONLY_RAY_VARIABLE in os.environ or "ray" in sys.modules:
        return  # the operator's choice, or too late for Ray to read it
    if address in (None, "", "auto"):
        if os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
        else:
            temp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
            try:
                address = Path(temp or "/tmp", "ray", "ray_current_cluster").read_text().strip()
            except OSError:
                return  # no local cluster: `ray.init` will start one or fail on its own terms
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return
    if loopback:
        os.environ[LOCAL_ONLY_RAY_VARIABLE] = "0"


def cmd_serve(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        print(f"ct2i: error: --port: must be within 1..65535, got {args.port}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cluster.config import ControlPlaneSettings

    settings = ControlPlaneSettings()
    started_ray = not args.address
    # Both before `import ray`, which reads them once: see local_ray_auth and local_ray_binding.
    auth = local_ray_auth() if started_ray else ""
    if started_ray:
        ray_binding = local_ray_binding(settings)
    else:
        ray_binding = {}
        loopback_driver_environment(args.address)
    import ray
    from ray import serve

    from cluster.service import ControlPlane
    from ct2i.scheduler import get_or_create_scheduler
    from serve.app import build_app

    ControlPlane.open(settings)  # creates (or migrates) the database before any replica opens it
    if started_ray:
        # A busy laptop can take longer than Serve's 5 s to start the HTTP proxy, which Serve then kills.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False,
                 **ray_binding)
        restrict_token_file()
        print(f"ct2i serve: Ray on {settings.ray_bind_host} (GCS {ray.get_runtime_context().gcs_address}), {auth}", flush=True)
    else:
        ray.init(address=args.address)
    exit_code = 0
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        # On a CPU-only box the replicas take fractions of a CPU, so a tuning task (one CPU) still fits beside them.
        generator_resources = {"num_cpus": 1, "num_gpus": 1} if has_gpus else {"num_cpus": 0.5, "num_gpus": 0}
        ingress_resources = {"num_cpus": 0.1}
        if started_ray:
            settings = settings_beside_serve(settings, ray.cluster_resources(), generator_resources, ingress_resources)
        get_or_create_scheduler(settings)
        serve.start(http_options={"host": args.host, "port": args.port})
        stop_signals = _StopSignals()  # after ray.init, whose core worker installs its own handlers
        serve.run(build_app(settings, generator_options={"ray_actor_options": generator_resources},
                            ingress_options={"num_replicas": 1, "ray_actor_options": ingress_resources}),
                  name=APP_NAME, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"ct2i serve: {url}  (web page {url}/, API docs {url}/docs, health {url}/healthz)", flush=True)
        print(f"ct2i serve: data {settings.home}, database {settings.database_url}, artifacts {settings.artifacts_uri}, "
              f"base model {settings.base_model}, jobs run with {settings.scheduler.runner} on "
              f"{'the cluster' if settings.capacity_gpus is None else format(settings.capacity_gpus, 'g')} capacity units",
              flush=True)
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
