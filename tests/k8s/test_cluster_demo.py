"""`make cluster-demo`: the Kubernetes flow's commands on a local Ray head end with an image from a tenant's adapter."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.service import ControlPlane

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.e2e]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cluster_demo_ends_with_an_image_from_a_tenants_adapter(tmp_path):
    out = tmp_path / "cluster-demo"
    env = {**os.environ, "CT2I_DEMO_OUT": str(out), "CT2I_DEMO_HTTP_PORT": str(_free_port()),
           "CT2I_DEMO_DASHBOARD_PORT": str(_free_port()), "CT2I_DEMO_GCS_PORT": str(_free_port()),
           "CT2I_DEMO_AGENT_PORT": str(_free_port()), "CT2I_DEMO_STEPS": "2"}
    result = subprocess.run(["bash", str(REPO / "k8s" / "local" / "cluster-demo.sh")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for line in ("ray start --head", "serve deploy", "ray job submit", "POST /v1/images/generations"):
        assert line in result.stdout
    assert "acme/pets" in result.stdout and "globex/toys" in result.stdout  # ct2i.job's final table
    # Ray's token auth was on for the whole flow (the suite's RAY_AUTH_MODE=disabled does not reach the head).
    assert "Ray token auth on: a client with a wrong token is refused" in result.stdout
    assert (out / "ray-auth-token").stat().st_mode & 0o077 == 0
    image = Image.open(out / "acme-pets.png")
    image.load()
    assert image.size == (64, 64)
    # The `ray job submit` batch published each tenant's adapter under that tenant, and nothing else.
    plane = ControlPlane.open(ControlPlaneSettings(home=out / "home", database_url=f"sqlite:///{out / 'home' / 'ct2i.db'}",
                                                   artifacts_uri=str(out / "home" / "artifacts")))
    published = sorted((a.tenant, a.name) for a in plane.list_adapters(None))
    assert published == [("acme", "pets"), ("globex", "toys")]
    assert {j.state for j in plane.list_jobs(None)} == {"succeeded"}
