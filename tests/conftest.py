"""Suite-wide setup: no network, no Ray token auth (local test clusters only), and one Ray for the session.

`ray_cluster` starts a local Ray once (4 logical CPUs and 1 logical GPU on 127.0.0.1; nothing touches CUDA)
for every in-process Ray test: the scheduler actor, Ray Train, Tune and Serve. Tests that use it are grouped
onto one pytest-xdist worker (`xdist_group("ray")`), run one after another there, while the other worker
takes the tests that start Ray processes of their own (`xdist_group("own-ray")`) and the tests that need no
Ray. A test that restarts Ray (`restart_ray`) leaves the same cluster shape behind.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a loaded 2-core machine Serve's proxy can take longer than its 5 s ready check to start.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_SHAPE = {"num_cpus": 4, "num_gpus": 1}
RAY_FIXTURES = {"ray_cluster", "serving", "references"}
# Tests that start Ray processes of their own (a `ray start` head, `ct2i serve`), each on its own ports and temp
# dir: a group of their own (`xdist_group("own-ray")`). xdist hands the largest groups out first, so they run on
# the other worker, beside the session-Ray tests, instead of after them on the critical path; the session's Ray
# is up for the whole run anyway, so this adds no coexistence that was not there, only overlap in time.
OWN_RAY_FILES = {"test_job.py", "test_cli_serve.py", "test_cluster_demo.py"}


def start_session_ray() -> None:
    import ray

    # Ray's workers inherit this environment: they must import the repository's packages and the test helpers.
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for attempt in range(3):  # on a machine shared with other clusters the raylet can time out waiting for its agents
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, **RAY_SHAPE)
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    start_session_ray()
    yield
    ray.shutdown()


@pytest.fixture
def restart_ray(ray_cluster):
    """Stop the session's Ray (every actor and task with it) and start it again, as a head restart would."""
    import ray

    def restart(between=lambda: None) -> None:
        ray.shutdown()
        between()
        start_session_ray()

    return restart


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif Path(str(item.fspath)).name in OWN_RAY_FILES:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group("own-ray"))


@pytest.fixture(autouse=True)
def end_leftover_runs():
    """After each test, force-end the attempt runs it left in flight. They belong to the detached launcher actor
    (`cluster.runner`), not to the test's scheduler, so they outlive it by design; a gated fake run left behind would
    hold its CPU into the next test. The launcher itself stays up: starting one costs a worker process."""
    yield
    import sys

    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    from cluster.runner import LAUNCHER_NAME

    try:
        launchers = [entry for entry in ray.util.list_named_actors(all_namespaces=True) if entry["name"] == LAUNCHER_NAME]
        for entry in launchers:
            ray.get(ray.get_actor(LAUNCHER_NAME, namespace=entry["namespace"]).end_all.remote(), timeout=30)
    except Exception:  # a test that stopped Ray or killed the launcher: nothing of its runs is left
        pass
