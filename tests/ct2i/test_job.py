"""`ray job submit -- python -m ct2i.job` against a real local head, as a batch user would run it.

The two-tenant batch that succeeds is run by `make cluster-demo` (tests/k8s/test_cluster_demo.py), which
submits it with the same command and checks each adapter is published under its own tenant; here, the
batch that must fail.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from causalt2i.data.synthetic import write_synthetic_spec
from cluster.config import ControlPlaneSettings
from cluster.service import ControlPlane

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AGENT_NOT_READY = "No available agent to submit job"
AGENT_RETRIES = 7


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("ct2i-home")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CT2I_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    # Its own temp dir (short: Ray's socket paths live under it) marks every process of this head, so the
    # teardown stops this head alone; `ray stop` would stop every Ray on the machine.
    temp_dir = tempfile.mkdtemp(prefix="ct2i-ray-", dir="/tmp")
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    # Its own agent port: Ray's default (52365) is the session Ray's, and an agent that cannot bind
                    # it never registers, so every submission would be refused ("No available agent").
                    "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2",
                    "--disable-usage-stats", "--temp-dir", temp_dir], env=env, check=True, capture_output=True, timeout=180)
    yield env, f"http://127.0.0.1:{dashboard}", home
    for signal_name in ("TERM", "KILL"):
        subprocess.run(["pkill", f"-{signal_name}", "-f", temp_dir], capture_output=True)
        time.sleep(2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env: dict, address: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"CT2I_HOME": str(home), "RAY_AUTH_MODE": "disabled"}}
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "ct2i.job", *args]
    # `ray start` returns before the head's job agent has registered; until then the job server refuses with
    # this message (HTTP 500, nothing submitted). Exactly that refusal is retried, a bounded number of times;
    # every other outcome is the test's to judge.
    delay = 2.0
    for _ in range(AGENT_RETRIES):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=800, cwd=REPO)
        if result.returncode == 0 or AGENT_NOT_READY not in result.stdout + result.stderr:
            return result
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    pytest.fail(f"the head's job agent did not become ready in {AGENT_RETRIES} submissions: {result.stderr[-2000:]}")


def _settings(home: Path) -> ControlPlaneSettings:
    saved = os.environ.get("CT2I_HOME")
    os.environ["CT2I_HOME"] = str(home)
    try:
        return ControlPlaneSettings()
    finally:
        if saved is None:
            os.environ.pop("CT2I_HOME")
        else:
            os.environ["CT2I_HOME"] = saved


def test_a_bad_spec_fails_the_job_with_the_field_named_and_publishes_nothing(head, tmp_path):
    env, address, home = head
    spec_path = write_synthetic_spec(tmp_path / "bad", tenant="initech", name="broken", steps=2, gpus_per_worker=0, images_per_subject=2)
    data = yaml.safe_load(spec_path.read_text())
    data["train"]["resolution"] = 100
    spec_path.write_text(yaml.safe_dump(data))
    result = _submit(env, address, home, str(spec_path), "--create-tenants")
    assert result.returncode != 0
    assert "train.resolution" in result.stdout + result.stderr
    plane = ControlPlane.open(_settings(home))
    assert "initech" not in [t.name for t in plane.list_tenants()], "a refused batch must not create its tenants"
    assert [j for j in plane.list_jobs(None) if j.tenant == "initech"] == []
    assert [a for a in plane.list_adapters(None) if a.tenant == "initech"] == []


def test_an_unplaceable_or_unoffered_spec_is_refused_before_anything_is_registered(head, tmp_path):
    """A worker no node of the head can hold (64 CPUs on a 2-CPU head) and a base the platform does not offer:
    both refused with the field named, exit 2, nothing stored (not admitted to wait for ever)."""
    env, address, home = head
    for name, change, field in (("huge", {"resources": {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 64}}, "spec.resources"),
                                ("pathy", {"base_model": "/etc"}, "spec.base_model")):
        spec_path = write_synthetic_spec(tmp_path / name, tenant="hooli", name=name, steps=2, gpus_per_worker=0, images_per_subject=2)
        data = yaml.safe_load(spec_path.read_text())
        data.update(change)
        spec_path.write_text(yaml.safe_dump(data))
        result = _submit(env, address, home, str(spec_path), "--create-tenants")
        assert result.returncode != 0
        assert field in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    plane = ControlPlane.open(_settings(home))
    assert "hooli" not in [t.name for t in plane.list_tenants()]
    assert [j for j in plane.list_jobs(None) if j.tenant == "hooli"] == []
