""".ci/k8s-tools.sh accepts a kubectl whose kustomize renders components and refuses one that cannot
(Debian 12's kubectl 1.20), before any test would fail obscurely."""

from __future__ import annotations

import os
import subprocess

from .conftest import REPO_ROOT

SCRIPT = REPO_ROOT / ".ci" / "k8s-tools.sh"


def _run(env_path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": env_path}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


def test_accepts_the_installed_kubectl(kubectl):
    result = _run(os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert "renders components: ok" in result.stderr


def test_refuses_a_kubectl_without_kustomize_components(tmp_path):
    fake = tmp_path / "kubectl"
    # What kubectl 1.20 (kustomize v2.0.3) answers to a kustomization with `components:`.
    fake.write_text('#!/bin/sh\nif [ "$1" = version ]; then echo "Client Version: v1.20.2"; exit 0; fi\n'
                    'echo \'Error: json: unknown field "components"\' >&2; exit 1\n')
    fake.chmod(0o755)
    result = _run(f"{tmp_path}:{os.environ['PATH']}")
    assert result.returncode == 1
    assert 'cannot render kustomize components (needs kubectl >= 1.21): Error: json: unknown field "components"' in result.stderr
