"""The head's GCS killed with Redis as the GCS store (KubeRay's GCS fault tolerance, `k8s/components/redis-gcs-ft`),
and the head started again: the detached scheduler actor and the Serve application come back by themselves.

Level: a real `ray start --head --block` on 127.0.0.1 (free ports, its own temp dir) whose GCS keeps its tables
in a real `redis-server` (Debian's package; `.ci/redis.sh` installs it in CI), started with the flags of the
component's Redis Deployment (append-only file, fsync every second, a password) and connected the way KubeRay
connects a head to it: `RAY_REDIS_ADDRESS`, `RAY_external_storage_namespace` (KubeRay uses the RayCluster's UID)
and `ray start --redis-password`. A driver process (`tests/faults/gcs_ft_driver.py`) starts the detached
scheduler actor (fake trainer in Ray tasks, held at a file gate) and the Serve app, and exits. With one job
running and two queued, the head's `gcs_server` is killed by PID: `ray start --block` then takes down every
process of the head, as the head container of a KubeRay pod does, and the test starts the head again with the
same command, as the kubelet restarts the container. Nothing is re-created by the test after that.

What must hold: the scheduler actor answers again under its name with the same actor id (restarted by the GCS from
the Redis tables, in a new process); the Serve application is RUNNING again and `/v1/generate` answers 200 within
the stated bound; the three jobs end `succeeded` exactly once (one `succeeded` event, one adapter, one usage row
per attempt), the running one resumed from its checkpoint, never from step 0.

One node only: a second `ray start --address` is refused on a head bound to loopback for real (Ray's
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so unlike KubeRay, where replicas on worker pods keep serving through the
restart, here every replica dies with the head and generation is down until Serve has brought them back.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.config import ControlPlaneSettings
from cluster.db import Database
from cluster.runner import run_dir_for
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from cluster.store import ArtifactStore
from tests.cluster.conftest import submit_simple, wait_for
from tests.cluster.fake_trainer import FileGate
from tests.conftest import REPO_ROOT
from tests.faults.conftest import kill_pids, process_tree, wait_gone
from tests.faults.test_scheduler_restarts import assert_consistent

NO_REDIS = "redis-server is not installed (bash .ci/redis.sh installs Debian's package; .ci/run calls it)"
if shutil.which("redis-server") is None and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the GCS fault-tolerance test: {NO_REDIS}")
pytestmark = [pytest.mark.timeout(1500), pytest.mark.skipif(shutil.which("redis-server") is None, reason=NO_REDIS)]

COMPONENT = REPO_ROOT / "k8s" / "components" / "redis-gcs-ft"
APP = "ct2i-gcs-ft"
CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}
JOBS = 3
# From the kill to the first 200 of /v1/generate: the head's start (GCS reloading from Redis), the old node
# declared dead (the GCS's health checks), the Serve controller restarted and its replicas rebuilt (the tiny base).
# Measured 155.6 s on the team's 2-core box at load average ≈ 11 (the head's own teardown took 61 s of it, the
# start 23 s); the bound is for a slower run, not for a head that never comes back.
GENERATION_BOUND_S = 240.0


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def component_redis_args() -> list[str]:
    """The redis-server flags of the component's Deployment, as it runs them (`--dir /data`, the password)."""
    docs = list(yaml.safe_load_all((COMPONENT / "redis.yaml").read_text()))
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    words = shlex.split(container["args"][0])
    assert words[:2] == ["exec", "redis-server"], words
    return words[2:]


def component_head_options() -> dict:
    patch = yaml.safe_load((COMPONENT / "rayservice-gcs-ft.yaml").read_text())
    return patch["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]


class Redis:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_ports(1)[0]
        self.password = secrets.token_hex(12)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Redis":
        args = []
        for word in component_redis_args():
            word = str(self.root) if word == "/data" else word
            args.append(self.password if word == "$REDIS_PASSWORD" else word)
        assert {"--appendonly", "--requirepass"} <= set(args), args
        # Loopback and a free port instead of the Service's 6379; no RDB snapshots to write beside the AOF.
        self.process = subprocess.Popen(["redis-server", *args, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", ""], stdout=open(self.root / "redis.log", "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_for(lambda: self.cli("PING") == "PONG", 30), (self.root / "redis.log").read_text()
        return self

    def cli(self, *command: str) -> str:
        done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning",
                               "-a", self.password, *command], capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class FaultTolerantHead:
    """`ray start --head --block` on 127.0.0.1 with its GCS in `redis`; `start` again after a kill is the restart."""

    def __init__(self, root: Path, redis: Redis, namespace: str):
        self.root = root
        self.redis = redis
        self.namespace = namespace
        # Ray's socket paths live under the temp dir and must stay short (a Unix socket path is at most 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ct2i-gcsft-"))
        names = ("gcs", "client", "node_manager", "object_manager", "agent_grpc", "agent_listen", "metrics",
                 "runtime_env")
        self.ports = dict(zip(names, free_ports(len(names))))
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    def env(self) -> dict[str, str]:
        paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                # `ray start` waits this long for its raylet to register (60 s by default): on a loaded 2-core box
                # the raylet's helpers alone take longer.
                "RAY_raylet_start_wait_time_s": "300",
                # What KubeRay sets on a head with gcsFaultToleranceOptions (the namespace: the RayCluster's UID).
                "RAY_REDIS_ADDRESS": f"127.0.0.1:{self.redis.port}", "RAY_external_storage_namespace": self.namespace}

    def start(self) -> None:
        p = self.ports
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   "--node-ip-address", "127.0.0.1", "--port", str(p["gcs"]), "--redis-password", self.redis.password,
                   "--temp-dir", str(self.temp_dir), "--num-cpus", "4", "--num-gpus", "0",
                   "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats", "--include-dashboard", "false",
                   "--ray-client-server-port", str(p["client"]), "--node-manager-port", str(p["node_manager"]),
                   "--object-manager-port", str(p["object_manager"]), "--dashboard-agent-grpc-port", str(p["agent_grpc"]),
                   "--dashboard-agent-listen-port", str(p["agent_listen"]), "--metrics-export-port", str(p["metrics"]),
                   "--runtime-env-agent-port", str(p["runtime_env"])]
        self.starts += 1
        log = open(self.root / f"head-{self.starts}.log", "w")
        self.process = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

    def start_and_wait(self, attempts: int = 10, timeout: float = 300.0) -> int:
        """Start the head until it is up, as the kubelet restarts a head container that exited; on this loaded
        2-core box the raylet sometimes gives up waiting 15 s for its dashboard agent. Returns the attempts."""
        for attempt in range(1, attempts + 1):
            self.start()
            try:
                self.wait_started(timeout)
                return attempt
            except RuntimeError:
                self.stop()
                self.keep_logs(f"failed-start-{self.starts}")
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def wait_started(self, timeout: float = 300.0) -> None:
        log = self.root / f"head-{self.starts}.log"
        deadline = time.monotonic() + timeout
        raylet_seen = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the head exited: {log.read_text()[-3000:]}")
            if "Ray runtime started" in log.read_text():
                return
            # The raylet aborts when its dashboard agent has not written its port file within 15 s (fixed in this
            # Ray; the agent's imports take longer than that on a loaded 2-core box), and `ray start` would wait
            # out RAY_raylet_start_wait_time_s for it: a crashed raylet ends this attempt at once.
            raylets = self.named("raylet")
            if raylets:
                raylet_seen = True
            elif raylet_seen:
                raise RuntimeError(f"the raylet exited during start: {log.read_text()[-1500:]}")
            time.sleep(1.0)
        raise RuntimeError(f"the head did not start in {timeout:g} s: {log.read_text()[-3000:]}")

    def keep_logs(self, name: str) -> None:
        """Copy the session's Ray logs next to the test's (the temp dir is removed at the end)."""
        logs = self.temp_dir / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, self.root / "ray-logs" / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("events", "export_events", "old"))

    def pids(self) -> list[int]:
        """Every process of the head: its `ray start`'s session (it starts a new one), so a process that a failed
        start left behind, reparented to init, is still found."""
        import psutil

        if self.process is None:
            return []
        found = set(process_tree(self.process.pid))
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid:
                    found.add(process.pid)
            except (OSError, psutil.Error):
                pass
        return sorted(found)

    def named(self, name: str) -> list[int]:
        import psutil

        found = []
        for pid in self.pids():
            try:
                process = psutil.Process(pid)
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if process.name() == name or " ".join(process.cmdline()).startswith(name):
                    found.append(pid)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        pids = self.pids()
        kill_pids(pids, signal.SIGTERM)
        if not wait_gone(pids, 20):
            kill_pids(self.pids() or pids)
            wait_gone(pids, 15)
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass


def driver(head: FaultTolerantHead, command: str, payload: dict, timeout: float = 600.0) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("gcs_ft_driver.py")), command,
                           json.dumps({"address": head.address, **payload})],
                          env=head.env(), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver {command} failed ({done.returncode}): {done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture
def gcs_ft_head(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.root.mkdir()
    redis.start()
    head = FaultTolerantHead(tmp_path, redis, namespace=f"ct2i-{secrets.token_hex(4)}")
    try:
        head.first_start_attempts = head.start_and_wait()
        yield head
    finally:
        head.stop()
        head.keep_logs("final")
        redis.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_head_restart_with_redis_gcs_keeps_scheduler_serve_and_jobs(gcs_ft_head, tmp_path, fault_figure):
    head = gcs_ft_head
    options = component_head_options()
    assert options["redisAddress"].endswith(":6379") and "secretKeyRef" in options["redisPassword"]["valueFrom"]

    settings = ControlPlaneSettings(
        home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'ct2i.db'}",
        artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1, scheduler_name="ct2i-scheduler-gcs-ft",
        scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.3, "lease_seconds": 3.0, "progress_write_seconds": 0.0})
    plane = ControlPlane(settings=settings, db=Database.open(settings.database_url), store=ArtifactStore(settings.artifacts_uri))
    plane.create_tenant("acme", Quotas(max_concurrent_jobs=1, generate_rpm=100_000))
    key = plane.create_key("tenant", "acme").key
    jobs = [submit_simple(plane, "acme", train={"resolution": 64, "steps": 12, "checkpoint_every": 2}, resources=CPU_JOB)
            for _ in range(JOBS)]
    gate = FileGate(tmp_path / "gate")
    gate.allow_up_to(4)
    http_port = free_ports(1)[0]
    base_url = f"http://127.0.0.1:{http_port}"
    setup = driver(head, "setup", {"settings": json.loads(settings.model_dump_json()), "gate": str(gate.path),
                                   "http_port": http_port, "app": APP})
    assert setup["serve"]["app"] == "RUNNING", setup
    body = {"adapter": "base", "prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{base_url}/v1/generate", json=body, headers=headers, timeout=120).status_code == 200
    assert wait_for(lambda: (plane.get_job("acme", jobs[0].id).progress.checkpoint_step or 0) >= 4, 300), \
        [(j.state, j.queue_reason, j.error) for j in plane.list_jobs(None)]
    states = [plane.get_job("acme", j.id).state for j in jobs]
    assert states == ["running", "queued", "queued"], states
    assert int(head.redis.cli("DBSIZE") or 0) > 0, "the GCS wrote nothing to Redis"
    old_scheduler = head.named("ray::SchedulerActor")
    old_controller = head.named("ray::ServeController")
    assert len(old_scheduler) == 1 and len(old_controller) == 1, (old_scheduler, old_controller)

    (gcs,) = head.named("gcs_server")
    old_pids = head.pids()
    os.kill(gcs, signal.SIGKILL)
    killed_at = time.monotonic()
    # `ray start --block` sees its GCS die and kills the rest of the head, as the head container exits in a pod.
    head.process.wait(60)
    if not wait_gone(old_pids, 60):
        kill_pids(old_pids)  # what the kubelet does to what is left of a container that exited
        assert wait_gone(old_pids, 30)
    head_down_s = time.monotonic() - killed_at
    gate.allow_up_to("open")
    restart_attempts = head.start_and_wait()
    head_up_s = time.monotonic() - killed_at

    first_200 = None
    answers: dict[int, int] = {}
    while time.monotonic() - killed_at < GENERATION_BOUND_S + 120:
        try:
            status = httpx.post(f"{base_url}/v1/generate", json=body, headers=headers, timeout=30).status_code
        except httpx.HTTPError:
            status = 0  # the proxy is not listening yet
        answers[status] = answers.get(status, 0) + 1
        if status == 200:
            first_200 = time.monotonic()
            break
        assert status in (0, 503, 504), f"while the head came back: {status}"
        time.sleep(1.0)
    assert first_200 is not None, (f"generation did not answer again; answers {answers}; the head was up {head_up_s:.0f} s "
                                   f"after the kill, on start attempt {restart_attempts}")
    generation_s = first_200 - killed_at

    after = driver(head, "probe", {"scheduler_name": settings.scheduler_name, "namespace": settings.ray_namespace,
                                   "app": APP, "wait_s": 120})
    assert after["scheduler_actor_id"] == setup["scheduler_actor_id"], (setup, after)
    assert after["scheduler"]["runner"] == setup["scheduler"]["runner"] and after["scheduler"]["last_error"] is None
    assert after["serve"]["app"] == "RUNNING", after
    assert after["serve"]["deployments"]["Generator"] == {"RUNNING": 1}, after
    new_scheduler = head.named("ray::SchedulerActor")
    assert len(new_scheduler) == 1 and new_scheduler[0] not in old_pids, (old_scheduler, new_scheduler)
    assert len(head.named("ray::ServeController")) == 1

    assert wait_for(lambda: all(plane.get_job("acme", j.id).state == "succeeded" for j in jobs), 600, 0.5), \
        [(j.state, j.attempts, j.error) for j in plane.list_jobs(None)]
    jobs_done_s = time.monotonic() - killed_at
    assert_consistent(plane, [j.id for j in jobs])
    assert sorted(a.version for a in plane.list_adapters("acme")) == list(range(1, JOBS + 1))
    log = (run_dir_for(plane, "acme", jobs[0].id) / "trainer" / "steps.log").read_text().splitlines()
    starts = [int(line.split()[1]) for line in log if line.startswith("start")]
    attempts = plane.get_job("acme", jobs[0].id).attempts
    history = [f"{e.state}: {e.message}" for e in plane.job_events("acme", jobs[0].id) if e.kind == "state"]
    print("the running job's attempts:", *history, sep="\n  ")
    # One trainer per attempt at most, the first from step 0 and every later one from the checkpoint. An attempt
    # may be lost before its trainer starts (stop 19's CI saw one, launched while the restarted head was still
    # settling; its cause was not recorded); that costs a retry, never a step. Each lost attempt is in the history.
    lost = [h for h in history if h.startswith("queued: ") and (" lost " in h or "launch failed" in h)]
    assert starts[0] == 0 and 2 <= len(starts) <= attempts and all(s >= 4 for s in starts[1:]), (starts, attempts, history)
    assert len(lost) == attempts - 1, (lost, attempts, history)
    plane.db.dispose()

    fault_figure(killed="head gcs_server (SIGKILL; the head's other processes die with it), head restarted, GCS in Redis",
                 requests_failed=None, probes_refused=sum(n for s, n in answers.items() if s != 200),
                 probe_statuses=sorted(answers),
                 jobs=JOBS, jobs_lost=0, jobs_duplicated=0, running_job_attempts=attempts, trainer_starts=len(starts), resumed_from_step=starts[1],
                 head_down_s=round(head_down_s, 1), head_up_s=round(head_up_s, 1), head_start_attempts=restart_attempts,
                 recovery_s=round(generation_s, 1), jobs_done_s=round(jobs_done_s, 1))
