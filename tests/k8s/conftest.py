from __future__ import annotations

from pathlib import Path

import pytest

from k8s import validation

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OVERLAYS = ("dev", "prod", "kueue")
JOBS = ("batch-tuning", "batch-tuning-kueue")


@pytest.fixture(scope="session")
def kubectl() -> str:
    binary = validation.kubectl_binary()
    if binary is None:
        pytest.skip("kubectl is not installed: run .ci/k8s-tools.sh (Debian's kubernetes-client) to render the overlays")
    return binary


@pytest.fixture(scope="session")
def crds() -> validation.CrdSchemas:
    folder = validation.crd_dir()
    if folder is None:
        pytest.skip(f"KubeRay CRDs not found: set {validation.CRD_DIR_ENV} or provide {validation.DEFAULT_CRD_DIR}")
    return validation.CrdSchemas.load(folder)


@pytest.fixture(scope="session")
def ray_version() -> str:
    return validation.dockerfile_ray_version(REPO_ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    """Every kustomization the repository ships, rendered once by kubectl: 'overlays/dev', 'jobs/...'."""
    targets = [f"overlays/{o}" for o in OVERLAYS] + [f"jobs/{j}" for j in JOBS] + ["base", "base/secrets"]
    return {target: validation.render(K8S / target) for target in targets}
