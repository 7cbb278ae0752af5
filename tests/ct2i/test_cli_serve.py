"""`ct2i serve` (and `make demo`'s entry, `python -m ct2i.demo`) in a subprocess, as an operator runs them: Ray's
token auth on, every socket the processes they started listen on bound to loopback, a driver without the token
refused; `ct2i serve` answers on its port, runs the tunings submitted to it after it started as their specs say
(a search as 3 trials, `num_workers: 2` as two workers), and SIGTERM stops it cleanly.

The suite turns Ray auth off (tests/conftest.py); these tests take it out of the children's environment again,
and give them a home of their own so Ray's token file (~/.ray/auth_token) is made there, not in the user's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ct2i.listeners import descendants, exposed, listening_sockets
from tests.serve.conftest import REPO_ROOT, free_port, wait_healthy

pytestmark = [pytest.mark.timeout(800), pytest.mark.slow]

GCS_LINE = re.compile(r"Ray on (?P<host>\S+) \(GCS (?P<gcs>[^)]+)\), Ray token auth on \(token: (?P<token>[^)]+)\)")


def operator_env(tmp_path: Path) -> dict[str, str]:
    """This environment as an operator's shell has it: no RAY_AUTH_MODE (Ray's default: token), no RAY_ADDRESS."""
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = {**os.environ, "HOME": str(user_home), "CT2I_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


class Output:
    """A child's merged stdout, read on a thread (so a full pipe never blocks it), searchable while it runs."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for line in list(self.lines):
                if found := pattern.search(line):
                    return found
            time.sleep(0.5)
        raise TimeoutError(f"{pattern.pattern!r} not printed within {timeout_s} s:\n{self.text}")

    @property
    def text(self) -> str:
        return "".join(self.lines)


def assert_ray_on_loopback(root_pid: int) -> list[tuple[str, str, int]]:
    sockets = listening_sockets(descendants(root_pid))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the sockets of Ray's own processes were read
    assert exposed(sockets) == [], f"listening beyond loopback: {exposed(sockets)}"
    return sockets


def driver(gcs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The way the `ct2i` drivers connect: a loopback cluster needs Ray's one-machine switch in the driver too.
    code = ("from ct2i.cli_serve import loopback_driver_environment; loopback_driver_environment(%r); "
            "import ray; ray.init(address=%r, include_dashboard=False, log_to_driver=False); "
            "print('CONNECTED', ray.cluster_resources().get('CPU'))" % (gcs, gcs))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


def assert_token_required(gcs: str, env: dict[str, str], token_file: Path) -> None:
    assert token_file.is_file() and token_file.stat().st_mode & 0o077 == 0, "the token file is the owner's alone"
    wrong = driver(gcs, {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
    assert "CONNECTED" not in wrong.stdout, wrong.stdout
    assert wrong.returncode != 0 and re.search(r"auth|token|UNAUTHENTICATED", wrong.stderr, re.I), wrong.stderr[-2000:]
    # The same user's drivers read the token file and connect. Ray turns token mode on by itself only for
    # address "auto"/None (what the CLI's own drivers use); with an explicit address a driver sets it.
    right = driver(gcs, {**env, "RAY_AUTH_MODE": "token"})
    assert "CONNECTED" in right.stdout, right.stderr[-2000:]


@dataclass
class Served:
    """A running `ct2i serve`, as an operator started it, with one tenant and its key."""

    process: subprocess.Popen
    output: Output
    port: int
    key: str
    env: dict[str, str]
    home: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `ct2i serve` for this module's tests (it takes minutes to start here); the SIGTERM test, the last,
    stops it, and this stops it in any case."""
    from cluster.config import ControlPlaneSettings
    from cluster.service import ControlPlane

    tmp_path = tmp_path_factory.mktemp("serve")
    env = operator_env(tmp_path)
    plane = ControlPlane.open(ControlPlaneSettings.from_env(env))
    plane.create_tenant("acme")
    key = plane.create_key("tenant", "acme").key
    plane.db.dispose()
    port = free_port()
    # 4 logical CPUs: the Serve replicas hold 0.6, and a `num_workers: 2` tune needs 2 beside its driver.
    process = subprocess.Popen([sys.executable, "-m", "ct2i.cli", "serve", "--port", str(port), "--num-cpus", "4"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(process)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", timeout_s=480)
        except TimeoutError:
            raise AssertionError(f"ct2i serve did not come up:\n{output.text[-6000:]}") from None
        yield Served(process=process, output=output, port=port, key=key, env=env, home=tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def submit(served: Served, spec_path: Path) -> dict:
    """`ct2i submit` as a remote client does it: the REST API with the tenant's key (the real CLI, in a subprocess)."""
    env = {**served.env, "CT2I_API_KEY": served.key}
    done = subprocess.run([sys.executable, "-m", "ct2i.cli", "--api", served.url, "submit", str(spec_path), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def wait_terminal(served: Served, job_id: str, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = httpx.get(f"{served.url}/v1/tunings/{job_id}", headers={"Authorization": f"Bearer {served.key}"},
                        timeout=30).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} not done within {timeout_s} s: {job}\n{served.output.text[-4000:]}")


def fetched_adapter(served: Served, adapter_id: str, into: Path) -> Path:
    from cluster.config import ControlPlaneSettings
    from cluster.service import ControlPlane

    plane = ControlPlane.open(ControlPlaneSettings.from_env(served.env))
    try:
        stored = plane.get_adapter(None, adapter_id)
        plane.store.fetch_dir("acme", plane.store.parse_uri(stored.uri, "acme"), into)
    finally:
        plane.db.dispose()
    return into


@pytest.mark.e2e
@pytest.mark.timeout(1500)  # with the module's `ct2i serve` start (up to 480 s)
def test_after_ct2i_serve_a_search_spec_runs_three_trials_and_a_two_worker_spec_two_workers(served, tmp_path):
    """`ct2i serve` started the scheduler (with the runner its settings name, `ray_train`); tunings submitted
    afterwards through REST run as their specs say, not as whatever runner the first driver happened to bring."""
    import yaml

    from causalt2i.adapter import load_adapter
    from causalt2i.data.synthetic import write_synthetic_spec
    from tune.search import read_search_record

    specs = {}
    for name, edit in {
        "searched": lambda data: data.update(search={
            "num_samples": 3, "max_concurrent": 2, "alpha_scale": {"loguniform": [0.1, 10.0]},
            "eval_prompts": 1, "eval_seeds": [0, 1], "eval_steps": 2, "grace_period": 2}),
        "two-workers": lambda data: data["resources"].update(num_workers=2),
    }.items():
        spec_path = write_synthetic_spec(tmp_path / name, tenant="acme", name=name, resolution=64, steps=2,
                                         n_subjects=2, images_per_subject=2, size=64, gpus_per_worker=0)
        data = yaml.safe_load(spec_path.read_text())
        data["resources"]["cpus_per_worker"] = 1
        edit(data)
        spec_path.write_text(yaml.safe_dump(data))
        specs[name] = spec_path
    jobs = {name: submit(served, path) for name, path in specs.items()}
    done = {name: wait_terminal(served, job["id"], timeout_s=900) for name, job in jobs.items()}
    for name, job in done.items():
        assert job["state"] == "succeeded", (name, job)

    searched = fetched_adapter(served, done["searched"]["adapter_id"], tmp_path / "searched-adapter")
    record = read_search_record(searched)
    assert len(record.trials) == 3 and len({t.trial_id for t in record.trials}) == 3
    assert all(t.status == "finished" for t in record.trials), record.trials
    assert done["searched"]["progress"]["total_steps"] == 3  # a search's progress counts trials
    two = load_adapter(fetched_adapter(served, done["two-workers"]["adapter_id"], tmp_path / "two-adapter"))
    assert two.manifest.training["world_size"] == 2 and two.manifest.step == 2


@pytest.mark.e2e
def test_ct2i_serve_keeps_ray_auth_on_listens_on_loopback_and_stops_on_sigterm(served):
    process, output, port, key, env = served.process, served.output, served.port, served.key, served.env
    ray_line = output.wait_for(GCS_LINE, 10)
    assert ray_line["host"] == "127.0.0.1" and ray_line["gcs"].startswith("127.0.0.1:")
    response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", headers={"Authorization": f"Bearer {key}"},
                          json={"adapter": "base", "prompt": "a cat", "steps": 1, "seed": 0}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert httpx.get(f"http://127.0.0.1:{port}/v1/tunings", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    sockets = assert_ray_on_loopback(process.pid)
    assert any(p == port for _, _, p in sockets)  # the Serve proxy's port is among those read
    assert_token_required(ray_line["gcs"], env, Path(ray_line["token"]))
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output.thread.join(timeout=10)
    assert process.returncode == 0, output.text
    assert f"http://127.0.0.1:{port}" in output.text and "SIGTERM, shutting down" in output.text
    assert "token auth is off" not in output.text
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


@pytest.mark.e2e
def test_demo_starts_ray_with_auth_on_and_on_loopback(tmp_path):
    """`make demo` runs `python -m ct2i.demo`: its Ray (GCS, raylet, agents, the scheduler actor's worker) is read
    once it is up, then the demo is interrupted (Ctrl-C), which shuts its Ray down."""
    env = operator_env(tmp_path)
    # An xdist worker ignores SIGINT and a child inherits that: Python then never raises KeyboardInterrupt, and
    # the demo ran to its end instead of stopping (340 s). A terminal's Ctrl-C reaches a default handler.
    process = subprocess.Popen([sys.executable, "-m", "ct2i.demo", "--out", str(tmp_path / "demo-out"), "--steps", "2",
                                "--port", str(free_port())],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = Output(process)
    try:
        ray_line = output.wait_for(GCS_LINE, 300)
        output.wait_for(re.compile(r"submitted "), 120)  # the scheduler actor is being started
        assert ray_line["host"] == "127.0.0.1"
        assert_ray_on_loopback(process.pid)
        assert_token_required(ray_line["gcs"], env, Path(ray_line["token"]))
        process.send_signal(signal.SIGINT)
        # Ctrl-C lands mid-tune: the demo stops waiting and shuts its Ray down (Train worker included).
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "token auth is off" not in output.text


def test_a_loopback_bind_host_keeps_ray_from_resolving_it_to_the_routable_address(monkeypatch):
    """Ray 2.60 swaps a loopback `_node_ip_address` for the machine's routable one unless its one-machine switch is
    set before import; the sockets tests above see the leak only where the machine has such an address (CI does;
    a sandbox with loopback alone does not)."""
    from cluster.config import ControlPlaneSettings
    from ct2i.cli_serve import LOCAL_ONLY_RAY_VARIABLE, local_ray_binding

    monkeypatch.setenv(LOCAL_ONLY_RAY_VARIABLE, "1")  # so that monkeypatch restores the variable's absence after
    monkeypatch.delenv(LOCAL_ONLY_RAY_VARIABLE)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert local_ray_binding(ControlPlaneSettings(ray_bind_host="0.0.0.0")) == {"_node_ip_address": "0.0.0.0"}
    assert LOCAL_ONLY_RAY_VARIABLE not in os.environ  # an operator who binds the host's address may add nodes
    assert local_ray_binding(ControlPlaneSettings(ray_bind_host="127.0.0.1")) == {"_node_ip_address": "127.0.0.1"}
    assert os.environ[LOCAL_ONLY_RAY_VARIABLE] == "0"
    code = ("import ray._private.services as s, ray._private.ray_constants as c; "
            "print(c.ENABLE_RAY_CLUSTER, s.resolve_ip_for_localhost('127.0.0.1'))")
    child = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                           timeout=120)
    assert child.stdout.split() == ["False", "127.0.0.1"], child.stderr[-2000:]


@pytest.mark.parametrize(("address", "recorded", "local_only"), [
    ("127.0.0.1:6379", None, True),
    ("ray://127.0.0.1:10001", None, True),
    ("[::1]:6379", None, True),
    ("localhost:6379", None, True),
    ("10.0.0.5:6379", None, False),
    ("auto", "127.0.0.1:41891", True),
    (None, "192.0.2.2:41891", False),
    (None, None, False),
])
def test_a_driver_of_a_loopback_cluster_gets_the_one_machine_switch(monkeypatch, tmp_path, address, recorded, local_only):
    from ct2i.cli_serve import LOCAL_ONLY_RAY_VARIABLE, loopback_driver_environment

    monkeypatch.setenv(LOCAL_ONLY_RAY_VARIABLE, "1")
    monkeypatch.delenv(LOCAL_ONLY_RAY_VARIABLE)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    if recorded:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(recorded + "\n")
    loopback_driver_environment(address)
    assert (os.environ.get(LOCAL_ONLY_RAY_VARIABLE) == "0") is local_only


def test_local_ray_binding_after_import_ray_is_refused(monkeypatch):
    import ray  # noqa: F401  (the suite's own Ray import)

    from cluster.config import ControlPlaneSettings
    from ct2i.cli_serve import LOCAL_ONLY_RAY_VARIABLE, local_ray_binding

    monkeypatch.setenv(LOCAL_ONLY_RAY_VARIABLE, "1")
    monkeypatch.delenv(LOCAL_ONLY_RAY_VARIABLE)
    with pytest.raises(RuntimeError, match="before `import ray`"):
        local_ray_binding(ControlPlaneSettings(ray_bind_host="127.0.0.1"))


def test_ray_bind_host_is_an_ip_address():
    from pydantic import ValidationError

    from cluster.config import ControlPlaneSettings

    assert ControlPlaneSettings(ray_bind_host="0.0.0.0").ray_bind_host == "0.0.0.0"  # an operator's explicit choice
    with pytest.raises(ValidationError, match="ray_bind_host"):
        ControlPlaneSettings(ray_bind_host="localhost; rm -rf /")


def test_bad_port_is_one_line_and_exit_2(tmp_path, capsys):
    from ct2i.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.parametrize(("resources", "configured", "capacity"), [
    ({"CPU": 4.0}, None, 3.0),  # 4 CPUs less the replicas' 0.6
    ({"CPU": 16.0, "GPU": 2.0}, None, 1.0),  # the generator holds one of the two GPUs
    ({"CPU": 16.0, "GPU": 4.0}, None, 3.0),
    ({"CPU": 1.0}, None, 1.0),  # never below one unit: a CPU job of a fraction still fits
    ({"CPU": 16.0, "GPU": 2.0}, 8.0, 8.0),  # CT2I_CAPACITY_GPUS is the operator's word
])
def test_ct2i_serve_gives_tunings_the_capacity_its_replicas_leave(resources, configured, capacity):
    from cluster.config import ControlPlaneSettings
    from ct2i.cli_serve import settings_beside_serve

    has_gpus = "GPU" in resources
    generator = {"num_cpus": 1, "num_gpus": 1} if has_gpus else {"num_cpus": 0.5, "num_gpus": 0}
    settings = ControlPlaneSettings(capacity_gpus=configured)
    assert settings_beside_serve(settings, resources, generator, {"num_cpus": 0.1}).capacity_gpus == capacity
