"""`ct2i serve` in a subprocess: it comes up on the port it was given, answers, and SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import REPO_ROOT, free_port, wait_healthy

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def test_ct2i_serve_runs_in_the_foreground_until_sigterm(tmp_path):
    from cluster.config import ControlPlaneSettings
    from cluster.service import ControlPlane

    home = tmp_path / "home"
    env = {**os.environ, "CT2I_HOME": str(home), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    plane = ControlPlane.open(ControlPlaneSettings.from_env(env))
    plane.create_tenant("acme")
    key = plane.create_key("tenant", "acme").key
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--num-cpus", "2"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=240)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", headers={"Authorization": f"Bearer {key}"},
                              json={"adapter": "base", "prompt": "a cat", "steps": 1, "seed": 0}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/tunings", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output and "SIGTERM, shutting down" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_bad_port_is_one_line_and_exit_2(tmp_path, capsys):
    from cluster.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
