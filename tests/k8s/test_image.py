"""The container image: the official Ray GPU image of the project's Ray version, the project's pinned
dependencies, a non-root user, no model weights, a build context without venvs or data."""

from __future__ import annotations

import re

import pytest

from k8s import validation

from .conftest import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def test_base_image_is_the_official_ray_gpu_image_of_the_installed_ray():
    import ray

    assert validation.dockerfile_ray_version() == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG PYTHON_TAG=py311$", DOCKERFILE, re.MULTILINE)


def test_image_runs_as_a_numeric_non_root_user():
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert users, "no USER line"
    uid = users[-1].partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_no_model_weights_in_the_image():
    for forbidden in ("from_pretrained", "snapshot_download", "huggingface-cli", "hf download"):
        assert forbidden not in DOCKERFILE
    copied = " ".join(re.findall(r"^(?:COPY|ADD) (.+)$", DOCKERFILE, re.MULTILINE))
    assert not re.search(r"models|\.safetensors|\.ckpt|\.bin", copied), copied


def test_pins_match_the_tested_environment():
    import importlib.metadata as metadata

    pins = dict(line.split("==", 1) for line in (REPO_ROOT / "k8s/image/constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["ray"] == validation.dockerfile_ray_version()
    for package in ("torch", "diffusers", "deepspeed", "pydantic", "sqlalchemy"):
        assert pins[package] == metadata.version(package).split("+")[0], package


@pytest.mark.parametrize("path", [".venv/lib/x.py", ".git/HEAD", "out/x.png", "tests/k8s/test_image.py",
                                  "causalt2i/__pycache__/a.pyc", "data/cat.jpg", "adapter.safetensors"])
def test_build_context_excludes(path):
    # An allowlist: everything is excluded first, then only what the Dockerfile copies is let back in.
    lines = [l.strip() for l in (REPO_ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = [l[1:].rstrip("/") for l in lines if l.startswith("!")]
    top = path.split("/")[0]
    excluded_again = any(part in path for part in ("__pycache__", ".pyc", ".safetensors"))
    assert top not in allowed or excluded_again


def test_dockerfile_copies_only_what_dockerignore_allows():
    allowed = {l[1:].rstrip("/") for l in (REPO_ROOT / ".dockerignore").read_text().splitlines() if l.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", DOCKERFILE, re.MULTILINE):
        copied.update(line.split()[:-1])
    assert copied <= allowed, copied - allowed
