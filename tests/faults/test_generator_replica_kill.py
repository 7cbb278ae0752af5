"""One of two generator replicas killed (SIGKILL of its process) under a bounded HTTP load.

Level: the real Serve application (`serve.app.build_app`: Ingress + Generator on the tiny base, two Generator
replicas), on the suite's local Ray, driven through Serve's HTTP proxy by httpx: 120 generate requests at
concurrency 8. After a few dozen have answered, one Generator replica's process (found by its process title,
`ray::ServeReplica:<app>:Generator`, among this test's own Ray processes) is killed with `kill -9`.

What must hold: every answer is a 200 or a retryable 503 with `Retry-After` and the opaque error body (code
`unavailable`, a correlation id; never a 500, never a hang past the request timeout); no more requests fail than
could have been in flight on the dead replica (the load's concurrency); the surviving replica keeps serving while
the other is replaced; Serve starts a new replica process within the stated bound; every request sent after that
succeeds, including a fresh burst at the same concurrency.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from tests.faults.conftest import process_tree, wait_gone
from tests.serve.conftest import free_port, wait_healthy

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("ray_cluster")]

APP = "ct2i-faults-replicas"
REPLICAS = 2
REQUESTS = 120
CONCURRENCY = 8
KILL_AFTER = 24  # answered requests before the kill: the load is well under way, most of it still to come
AFTER_BURST = 2 * CONCURRENCY
REQUEST_TIMEOUT_S = 60.0  # serve.request_timeout_s: the ingress answers 504 past it
HANG_SLACK_S = 15.0  # an answer may come this much after the ingress's timeout (proxy, a loaded 2-core box)
# A new replica process is a Ray worker start, the tiny base's build and Serve's health check: on this 2-core
# machine shared by other jobs that measured 20-40 s; the bound leaves room for a slower run, not for a hang.
RECOVERY_BOUND_S = 150.0
BODY = {"adapter": "base", "prompt": "a photo of a cat", "steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64}


@dataclass
class Answer:
    index: int
    sent: float  # time.monotonic()
    done: float
    status: int  # 0: no HTTP answer (a timeout or a dropped connection)
    headers: dict
    body: dict | None
    error: str = ""


def replica_pids() -> list[int]:
    """The Generator replicas of this test's app among this process's own Ray processes (the local Ray's raylet
    and workers are descendants of this driver), so another Ray on the machine is never touched."""
    import psutil

    title = f"ray::ServeReplica:{APP}:Generator"
    found = []
    for pid in process_tree(os.getpid()):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if cmdline.startswith(title):
            found.append(pid)
    return sorted(found)


def generator_states() -> dict:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "Generator" not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments["Generator"].replica_states.items()}


@pytest.fixture(scope="module")
def replicas_app(tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    work = tmp_path_factory.mktemp("replica-kill")
    settings = ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                    artifacts_uri=str(work / "artifacts"), capacity_gpus=1)
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={
        "request_timeout_s": REQUEST_TIMEOUT_S, "max_generations_per_tenant": 2 * CONCURRENCY})})
    plane = ControlPlane.open(settings)
    plane.create_tenant("load", Quotas(generate_rpm=100_000))
    key = plane.create_key("tenant", "load").key
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(settings, batch_wait_s=0.02,
                            generator_options={"num_replicas": REPLICAS, "health_check_period_s": 2,
                                               "health_check_timeout_s": 120,
                                               "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}},
                            ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}),
                  name=APP, route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, 300)
        yield base_url, key
    finally:
        serve.delete(APP)
        serve.shutdown()
        plane.db.dispose()


def post(client: httpx.Client, index: int) -> Answer:
    sent = time.monotonic()
    try:
        response = client.post("/v1/generate", json={**BODY, "seed": index})
    except httpx.HTTPError as err:
        return Answer(index, sent, time.monotonic(), 0, {}, None, f"{type(err).__name__}: {err}")
    body = None
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
    return Answer(index, sent, time.monotonic(), response.status_code, dict(response.headers), body)


def run_load(base_url: str, key: str, count: int, first_index: int, answers: list[Answer]) -> None:
    local = threading.local()

    def one(index: int) -> None:
        if not hasattr(local, "client"):
            # The client's timeout is past the ingress's: a request that hangs is seen as a hang, not cut short.
            local.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"},
                                        timeout=REQUEST_TIMEOUT_S + 2 * HANG_SLACK_S)
        answers.append(post(local.client, index))

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(first_index, first_index + count)))


def assert_retryable(answer: Answer) -> None:
    assert answer.status == 503, answer
    retry_after = answer.headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, answer
    detail = answer.body["detail"]
    assert detail["code"] == "unavailable", answer
    # Opaque: a correlation id, nothing of the exception (no actor id, no address, no traceback).
    assert re.fullmatch(r"[0-9a-f]{16}", detail.get("correlation_id", "")), answer
    assert detail["message"].endswith(f"correlation id {detail['correlation_id']}"), answer
    assert answer.headers.get("x-correlation-id") == detail["correlation_id"], answer
    assert not re.search(r"Actor|Error|Traceback|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", detail["message"]), answer


def test_generator_replica_killed_under_load(replicas_app, fault_figure):
    base_url, key = replicas_app
    deadline = time.monotonic() + 300
    while (time.monotonic() < deadline
           and (generator_states().get("RUNNING") != REPLICAS or len(replica_pids()) != REPLICAS)):
        time.sleep(0.5)
    before = replica_pids()
    assert len(before) == REPLICAS and generator_states() == {"RUNNING": REPLICAS}, (before, generator_states())
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        assert post(client, 10_000).status == 200  # warm: the first request pays the replicas' first forward pass

    answers: list[Answer] = []
    load = threading.Thread(target=run_load, args=(base_url, key, REQUESTS, 0, answers), daemon=True)
    load.start()
    while len(answers) < KILL_AFTER and load.is_alive():
        time.sleep(0.02)
    assert len(answers) >= KILL_AFTER, "the load ended before the kill"
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    answered_at_kill = len(answers)
    assert wait_gone([victim], 30), "the replica survived SIGKILL"

    recovered_at = None
    states_seen = set()
    while time.monotonic() - killed_at < RECOVERY_BOUND_S + 60:
        states = generator_states()
        states_seen.add(tuple(sorted(states.items())))
        now_pids = replica_pids()
        if (states == {"RUNNING": REPLICAS} and len(now_pids) == REPLICAS and victim not in now_pids):
            recovered_at = time.monotonic()
            break
        time.sleep(0.25)
    load.join(REQUEST_TIMEOUT_S * REQUESTS / CONCURRENCY)
    assert not load.is_alive(), "the load did not finish"
    assert recovered_at is not None, f"Serve did not replace the replica; states seen: {states_seen}"
    after = replica_pids()
    recovery_s = recovered_at - killed_at

    burst: list[Answer] = []
    run_load(base_url, key, AFTER_BURST, REQUESTS, burst)

    everything = answers + burst
    assert len(answers) == REQUESTS and len(burst) == AFTER_BURST
    unanswered = [a for a in everything if a.status == 0]
    assert not unanswered, f"requests got no HTTP answer: {unanswered[:3]}"
    hangs = [a for a in everything if a.done - a.sent > REQUEST_TIMEOUT_S + HANG_SLACK_S]
    assert not hangs, f"requests hung past the request timeout: {hangs[:3]}"
    others = [a for a in everything if a.status not in (200, 503)]
    assert not others, f"answers other than 200 or a retryable 503: {others[:3]}"
    failed = [a for a in everything if a.status == 503]
    for answer in failed:
        assert_retryable(answer)
        # Only a request that was in flight, or routed before Serve saw the death, may fail.
        assert answer.sent <= recovered_at, answer
    assert len(failed) <= CONCURRENCY, f"{len(failed)} requests failed; at most {CONCURRENCY} were in flight"
    served_meanwhile = [a for a in answers if a.status == 200 and killed_at < a.done < recovered_at]
    assert served_meanwhile, "the surviving replica served nothing while the other was replaced"
    after_recovery = [a for a in everything if a.sent > recovered_at]
    assert len(after_recovery) >= AFTER_BURST and all(a.status == 200 for a in after_recovery), \
        [a for a in after_recovery if a.status != 200][:3]
    assert victim not in after and len(set(after) - set(before)) == 1, (before, after)
    assert recovery_s <= RECOVERY_BOUND_S, f"the replica took {recovery_s:.1f} s to be replaced"

    fault_figure(killed="1 of 2 generator replicas (kill -9 of its process) under 120 requests at concurrency 8",
                 requests=len(everything), requests_failed=len(failed), failed_statuses=sorted({a.status for a in failed}),
                 answered_before_kill=answered_at_kill, served_while_replacing=len(served_meanwhile),
                 sent_after_recovery=len(after_recovery), max_latency_s=round(max(a.done - a.sent for a in everything), 2),
                 jobs_lost=0, jobs_duplicated=0, recovery_s=round(recovery_s, 1))
