"""The fault suite's fixtures: a two-node Ray cluster on one machine, killing by PID, and the figures each fault
test states.

`make cluster-faults` runs this folder serially (no xdist), after `make test` in `.ci/run`; `make test` never
collects it (`norecursedirs` in pyproject.toml). Every Ray process a test starts is started and stopped by
PID: never `ray stop`, which stops every Ray on the machine (another agent's, another test's).

`TwoNodeCluster` is a head (`ray start --head`) and a worker node (`ray start --address ...`, its own
`--temp-dir` and the custom resource `{"worker_node": 1}`), both on 127.0.0.1, each on ports of its own
(GCS, node manager, object manager, dashboard agent, metrics, runtime-env agent, worker port range), so they
never clash with each other or with another Ray in the same network namespace; `shared` is one folder both
nodes write, standing for the RWX PVC (or bucket) that `artifacts_uri` names in production. Each node is a
`ray start --block` process: every process of that node (raylet, agents, Ray workers, Train workers) is a
descendant of it, so `kill_node` can kill exactly that node, with SIGKILL, as a lost machine would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

WORKER_RESOURCE = "worker_node"
READY_LINE = "block forever"  # what `ray start --block` prints once its node is up
FIGURES: list[dict] = []


def _bindable(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_base(span: int = 2000, first: int = 20000, last: int = 60000) -> int:
    """A block of `span` ports that are all free now, for both nodes' fixed ports and worker ranges: outside a
    private network namespace (CI, a shared box) another Ray or another test's cluster may hold a fixed one."""
    import random

    bases = list(range(first, last - span, span))
    random.shuffle(bases)
    for base in bases:
        if all(_bindable(base + offset) for offset in range(span)):
            return base
    raise RuntimeError(f"no block of {span} free ports between {first} and {last}")


# Port blocks per node, far from Ray's defaults (6379, 8265, 10001, 52365); CT2I_FAULTS_PORT_BASE pins one.
PORT_BASE = int(os.environ.get("CT2I_FAULTS_PORT_BASE") or free_port_base())
# -- figures ---------------------------------------------------------------------------------------------


@pytest.fixture
def fault_figure(request):
    """`fault_figure(killed=..., requests_failed=..., jobs_lost=..., jobs_duplicated=..., recovery_s=...)`:
    the figure the test asserts, printed at the end of the run (and appended to `$CT2I_FAULTS_FIGURES`, a JSON
    lines file, when set), so BENCHMARKS.md's fault table is copied from a run, not typed."""

    def record(**figure) -> None:
        FIGURES.append({"test": request.node.name, **figure})

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("fault figures")
    for figure in FIGURES:
        terminalreporter.write_line(json.dumps(figure, default=str))
    out = os.environ.get("CT2I_FAULTS_FIGURES")
    if out:
        with open(out, "a") as handle:
            for figure in FIGURES:
                handle.write(json.dumps({**figure, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str) + "\n")


# -- processes by PID ------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant of it (children first found, the root last), live at the time of the call."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [child.pid for child in root.children(recursive=True)] + [root.pid]
    except psutil.NoSuchProcess:
        return []


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to each PID that is still alive; returns the ones it reached."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            reached.append(pid)
        except ProcessLookupError:
            pass
    return reached


def wait_gone(pids: list[int], timeout: float = 30.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


# -- the two-node cluster --------------------------------------------------------------------------------


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    process: subprocess.Popen
    log: Path
    ports: dict[str, int]
    node_id: str | None = None

    def pids(self) -> list[int]:
        """Its `ray start`'s tree, and whatever else runs in that process's session (it leads one: a GCS or raylet
        orphaned by a `ray start` that died is still this node's)."""
        import psutil

        tree = process_tree(self.process.pid)
        orphans = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid not in tree and os.getsid(proc.pid) == self.process.pid:
                    orphans.append(proc.pid)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return orphans + tree

    def alive(self) -> bool:
        return self.process.poll() is None


def _node_ports(index: int) -> dict[str, int]:
    base = PORT_BASE + 1000 * index
    return {"node_manager": base + 1, "object_manager": base + 2, "dashboard_agent_grpc": base + 3,
            "dashboard_agent_listen": base + 4, "metrics_export": base + 5, "runtime_env_agent": base + 6,
            "min_worker": base + 100, "max_worker": base + 999}


def _ray_start_args(ports: dict[str, int], temp_dir: Path, num_cpus: int) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats",
            # Drivers here never stream logs (log_to_driver=False); one Python process fewer competing with the
            # agents whose port files the raylet waits a fixed 15 s for.
            "--include-log-monitor", "false",
            "--node-manager-port", str(ports["node_manager"]), "--object-manager-port", str(ports["object_manager"]),
            "--dashboard-agent-grpc-port", str(ports["dashboard_agent_grpc"]),
            "--dashboard-agent-listen-port", str(ports["dashboard_agent_listen"]),
            "--metrics-export-port", str(ports["metrics_export"]),
            "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
            "--min-worker-port", str(ports["min_worker"]), "--max-worker-port", str(ports["max_worker"])]


@dataclass
class TwoNodeCluster:
    """A head and one worker node on 127.0.0.1, started and stopped by PID; see the module docstring."""

    root: Path
    cpus_per_node: int = 2
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @property
    def gcs_port(self) -> int:
        return PORT_BASE + 10

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def shared(self) -> Path:
        """The folder every node reads and writes: the artifacts store, and so Ray Train's `storage_path`."""
        return self.root / "shared"

    def env(self) -> dict[str, str]:
        paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        # Set to 0 (by `ct2i serve`'s loopback binding, or an operator's shell) Ray makes a cluster of one node, and
        # the worker node could never join the head (outside a loopback-only namespace, as on CI).
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        return env

    def _start(self, name: str, index: int, extra: list[str]) -> RayNode:
        # Ray's socket paths live under the temp dir and must stay short (a Unix socket path is at most 107 bytes).
        temp_dir = Path(tempfile.mkdtemp(prefix=f"ct2i-{name}-"))
        log = self.root / f"{name}.log"
        ports = _node_ports(index)
        handle = open(log, "w")
        process = subprocess.Popen(_ray_start_args(ports, temp_dir, self.cpus_per_node) + extra, env=self.env(),
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        node = RayNode(name=name, temp_dir=temp_dir, process=process, log=log, ports=ports)
        self.nodes[name] = node
        return node

    def start(self, timeout: float = 240.0, tries: int = 5) -> "TwoNodeCluster":
        self.shared.mkdir(parents=True, exist_ok=True)
        self._start_node("head", 0, ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                                     "--ray-client-server-port", str(PORT_BASE + 11)], 1, timeout, tries)
        self._start_node("worker", 1, ["--address", self.address, "--resources", json.dumps({WORKER_RESOURCE: 1})],
                         2, timeout, tries)
        return self

    def _start_node(self, name: str, index: int, extra: list[str], count: int, timeout: float, tries: int) -> None:
        """Start a node and wait for it, again (up to `tries` times) if its `ray start` gave up: Ray waits a fixed
        30 s for its raylet to register, which a loaded 2-core machine can miss."""
        for attempt in range(1, tries + 1):
            node = self._start(name, index, extra)
            try:
                self._wait_for_nodes(count, timeout)
                return
            except RuntimeError as err:
                if attempt == tries or "timed out during startup" not in str(err):
                    raise
                leftovers = node.pids()
                kill_pids(leftovers)
                wait_gone(leftovers, 30)

    def alive_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        """Until `count` nodes are alive in the GCS (asked from a short-lived `ray.nodes()` in a subprocess,
        so this process connects as a driver only once the cluster is whole)."""
        probe = ("import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False);"
                 "print('NODES', json.dumps([{'id': n['NodeID'], 'resources': n['Resources'], 'alive': n['Alive']}"
                 " for n in ray.nodes()]))") % self.address
        deadline = time.monotonic() + timeout
        last = ""
        # `ray start --block` says it blocks only once its node registered; until then a probe (a whole driver
        # start, seconds of CPU) would only slow the raylet it waits for on a loaded machine.
        while time.monotonic() < deadline and not all(
                READY_LINE in node.log.read_text(errors="replace") for node in self.nodes.values() if node.alive()):
            if not all(node.alive() for node in self.nodes.values()):
                break
            time.sleep(0.5)
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if not node.alive():
                    raise RuntimeError(f"ray node {node.name} exited: {node.log.read_text()[-3000:]}")
            done = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True,
                                  timeout=max(10.0, deadline - time.monotonic()))
            # The probe's stdout may carry Ray's own output (a raylet's backtrace); the answer is its NODES line.
            answers = [line[len("NODES "):] for line in done.stdout.splitlines() if line.startswith("NODES ")]
            last = answers[-1] if answers else (done.stdout + done.stderr)[-2000:]
            if done.returncode == 0 and answers:
                nodes = [n for n in json.loads(last) if n["alive"]]
                if len(nodes) >= count:
                    for n in nodes:
                        name = "worker" if WORKER_RESOURCE in n["resources"] else "head"
                        if name in self.nodes:
                            self.nodes[name].node_id = n["id"]
                    if count < 2 or self.nodes["worker"].node_id:
                        return
            time.sleep(2.0)
        raise RuntimeError(f"{count} Ray node(s) did not come up in {timeout:g} s; last probe: {last}")

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of node `name` (by PID, the whole tree of its `ray start`); returns the PIDs."""
        node = self.nodes[name]
        pids = node.pids()
        kill_pids(pids)
        assert wait_gone(pids), f"processes of {name} survived SIGKILL"
        node.process.wait(10)
        return pids

    def stop(self) -> None:
        """Stop every node this cluster started, by PID (worker first, then the head)."""
        for name in ("worker", "head"):
            node = self.nodes.get(name)
            if node is None:
                continue
            pids = node.pids()
            kill_pids(pids, signal.SIGTERM)
            if not wait_gone(pids, 15):
                kill_pids(node.pids() or pids)
                wait_gone(pids, 15)
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A started two-node cluster with this process connected to it as a driver (on the head: Ray prefers the
    head when several nodes share the IP); Ray is disconnected and every node's process tree killed after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("two-nodes"))
    try:
        cluster.start()
        os.environ["PYTHONPATH"] = cluster.env()["PYTHONPATH"]
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        assert ray.get_runtime_context().get_node_id() == cluster.nodes["head"].node_id, "the driver is not on the head"
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """The fault suite's own local Ray (the session fixture's shape), per module: a module that uses `two_nodes`
    must not find a session Ray connected in this process."""
    import ray

    from tests.conftest import start_session_ray

    if ray.is_initialized():
        ray.shutdown()
    start_session_ray()
    yield
    ray.shutdown()


def actors_created(class_name: str) -> int:
    """Actors of `class_name` this Ray cluster has created, alive or dead (the GCS keeps dead actors listed): Ray
    Train's per-run helpers (`PreemptionWatcher`) are gone by the time a run has ended."""
    import ray

    return sum(1 for actor in ray._private.state.actors().values() if actor["ActorClassName"] == class_name)


def node_of(marker: Path, timeout: float = 600.0) -> dict:
    """The node a held Train worker runs on, from the marker `tune.worker`'s `hold` fault writes: {"node_id",
    "pid", "step", "rank"}; waits for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            try:
                return json.loads(marker.read_text())
            except json.JSONDecodeError:
                pass  # being written
        time.sleep(0.2)
    raise AssertionError(f"no worker reached the held step within {timeout:g} s (no {marker})")
