"""Many tenants at once on the two-node cluster: 20 jobs from 5 tenants with different fair-share weights and
concurrent-job quotas, through the real `Scheduler` and `RayTaskRunner` (one Ray task per attempt, 1 CPU each,
so the 4 CPUs of the two nodes are the 4 capacity units and Ray spreads the runs over both nodes).

The runs are the suite's fake trainer (`tests.cluster.fake_trainer`: the attempt's real progress sink, a real
adapter file, verified, published and registered by the real `execute_attempt`), paced at a fixed time per step
so every job holds its unit for about the same time, as tiny tunes of one spec would. A real tune costs ~70 s of
start-up on this machine; 20 of them on 4 CPUs would be ~10 minutes of DeepSpeed start-ups saying nothing more
about admission, which is what is under test here.

Workload: weights a 4, b 2, c 2, d 1, e 1 and jobs in the same proportion (8, 4, 4, 2, 2), so under weighted
fair share every tenant stays backlogged to the end and after n completions tenant t should have completed
n·w_t/W (W = 10); concurrent-job quotas a 2, b 2, c 1, d 1, e 1. Jobs are submitted lightest tenant first
(e's, then d's, ..., a's last), the order in which FIFO would run them.

Figures (asserted):
- all 20 jobs `succeeded`, each with exactly one attempt started (the `attempt N started` events), one run of
  the trainer (its start lines in the run folder), one `succeeded` event and one adapter: lost 0, duplicated 0;
- quotas: from the record of every job's admission and end (the interval it counts against its tenant's
  quota, in the database's commit order), the most a tenant ever had active at once is ≤ its quota (so is the
  most its trainer runs overlapped in wall time), and a's quota of 2 was reached (its weight asks
  for 1.6 of the 4 units, so the quota binds and the check can fail; b's 0.8 seldom needs its 2); never more
  than 4 active in all; a sampler reading the job table every 50 ms agrees;
- order: for every prefix of the completion order (the `succeeded` events in commit order), every tenant's
  count of completed jobs is within 2.5 jobs of n·w_t/W. FIFO in this submit order is 4.8 off (a completes
  nothing in the first 12); a weight-blind fair share is > 2.5 off in about half of 300 simulated runs of this workload with the
  same jitter (`FairShareQueue` on a fake clock), so the bound tells weights being followed from not.
- both nodes ran jobs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from cluster.config import ControlPlaneSettings
from cluster.db import Adapter, Job, JobEvent
from cluster.runner import RayTaskRunner, run_dir_for
from cluster.scheduler import Scheduler
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from tests.cluster.conftest import submit_simple
from tests.cluster.fake_trainer import FakeTrainer

pytestmark = [pytest.mark.timeout(1200)]

WEIGHTS = {"a": 4.0, "b": 2.0, "c": 2.0, "d": 1.0, "e": 1.0}
JOBS = {"a": 8, "b": 4, "c": 4, "d": 2, "e": 2}
QUOTAS = {"a": 2, "b": 2, "c": 1, "d": 1, "e": 1}
CAPACITY = 4  # CPU units: 2 CPUs on each node, 1 per run
STEPS, SECONDS_PER_STEP = 4, 0.75
PREFIX_BOUND = 2.5
CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}


class PacedGate:
    """The fake trainer's gate at a fixed step time: step i of a run may start `i - 1` step times after its
    first, so every job holds its capacity for about the same time (no test-side releasing, no shared state)."""

    def __init__(self, seconds_per_step: float):
        self.seconds_per_step = seconds_per_step
        self._first: float | None = None

    def wait(self, step: int, stop) -> bool:
        now = time.monotonic()
        if self._first is None:
            self._first = now
        due = self._first + (step - 1) * self.seconds_per_step
        while time.monotonic() < due:
            if stop():
                return False
            time.sleep(min(0.05, max(0.0, due - time.monotonic())))
        return True


class RecordingTrainer:
    """The fake trainer, recording where and when each run of it went (one JSON file per run, in the shared
    folder): node, job, attempt, start and end."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)

    def __call__(self, spec, run_dir, ctx):
        import uuid

        import ray

        record = {"job": ctx.job_id, "tenant": ctx.tenant, "attempt": ctx.attempt,
                  "node": ray.get_runtime_context().get_node_id(), "start": time.time()}
        result = FakeTrainer(PacedGate(SECONDS_PER_STEP))(spec, run_dir, ctx)
        record["end"] = time.time()
        (self.runs_dir / f"{ctx.job_id}-{ctx.attempt}-{uuid.uuid4().hex[:8]}.json").write_text(json.dumps(record))
        return result


def _warm(cpus: int) -> set[str]:
    """One Ray worker per CPU on each node, with the fake trainer imported: the runs below then start in warm
    workers, so the first jobs are not charged a cold worker start (seconds here) the later ones are not."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> str:
        import tests.cluster.fake_trainer  # noqa: F401

        time.sleep(2.0)  # hold the CPU so the next warm-up goes to another worker
        return ray.get_runtime_context().get_node_id()

    return set(ray.get([warm.remote() for _ in range(cpus)], timeout=600))


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])  # ends sort first
    most = current = 0
    for _, delta in edges:
        current += delta
        most = max(most, current)
    return most


def prefix_deviation(order: list[str], weights: dict[str, float]) -> float:
    """max over prefixes n and tenants t of |completed_t(n) − n·w_t/W|."""
    total = sum(weights.values())
    done, worst = Counter(), 0.0
    for n, tenant in enumerate(order, 1):
        done[tenant] += 1
        worst = max(worst, max(abs(done[t] - n * w / total) for t, w in weights.items()))
    return worst


def test_the_weight_rule_itself_tells_fifo_apart():
    fifo = [t for t in "edcba" for _ in range(JOBS[t])]
    assert prefix_deviation(fifo, WEIGHTS) == pytest.approx(4.8)
    ideal = ["a", "b", "c", "a", "d", "a", "b", "c", "a", "e"] * 2
    assert prefix_deviation(ideal, WEIGHTS) <= 1.0


def test_twenty_jobs_of_five_tenants_finish_once_within_quotas_in_weighted_order(two_nodes, fault_figure):
    root = two_nodes.shared
    settings = ControlPlaneSettings(
        home=root / "home", database_url=f"sqlite:///{root / 'ct2i.db'}", artifacts_uri=str(root / "artifacts"),
        capacity_gpus=CAPACITY,
        # min_charge_s: an in-flight job counts as a job's length of usage (STEPS × step time), so a tenant that
        # was just admitted does not look idle; no starvation reservation (every job needs the same one unit).
        scheduler={"tick_seconds": 0.2, "heartbeat_seconds": 0.5, "lease_seconds": 60.0, "progress_write_seconds": 0.0,
                   "min_charge_s": STEPS * SECONDS_PER_STEP, "starvation_after_s": 1e6})
    plane = ControlPlane.open(settings)
    runs_dir = root / "runs"
    runs_dir.mkdir()
    for tenant, weight in WEIGHTS.items():
        plane.create_tenant(tenant, Quotas(weight=weight, max_concurrent_jobs=QUOTAS[tenant]))
    warmed = _warm(CAPACITY)
    assert len(warmed) == 2, "the warm-up did not reach both nodes"

    jobs = {}
    for tenant in sorted(WEIGHTS, key=lambda t: WEIGHTS[t]):  # e, d first: FIFO's order
        for k in range(JOBS[tenant]):
            job = submit_simple(plane, tenant, name=f"{tenant}-{k}", resources=CPU_JOB,
                                train={"resolution": 64, "steps": STEPS, "checkpoint_every": 2})
            jobs[job.id] = tenant
    assert len(jobs) == 20

    sampled = Counter()
    sampled_total = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal sampled_total
        while not stop.wait(0.05):
            with plane.db.read() as session:
                active = session.execute(select(Job.tenant).where(Job.state.in_(("admitted", "running")))).scalars().all()
            sampled_total = max(sampled_total, len(active))
            for tenant, count in Counter(active).items():
                sampled[tenant] = max(sampled[tenant], count)

    sampler = threading.Thread(target=sample, daemon=True)
    scheduler = Scheduler(settings, RayTaskRunner(RecordingTrainer(runs_dir), num_cpus=1))
    started = time.monotonic()
    sampler.start()
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            scheduler.tick()
            states = [plane.get_job(None, job_id).state for job_id in jobs]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.2)
        wall_s = time.monotonic() - started
    finally:
        stop.set()
        sampler.join(5)
        scheduler.close()
    assert Counter(states) == {"succeeded": 20}, Counter(states)

    with plane.db.read() as session:
        events = session.execute(select(JobEvent).order_by(JobEvent.at, JobEvent.id)).scalars().all()
        adapters = Counter(session.execute(select(Adapter.job_id)).scalars().all())
        attempts = {job.id: job.attempts for job in session.execute(select(Job)).scalars()}
    # None twice: one attempt each, started once, the trainer run once, finished once, one adapter.
    starts = Counter(e.job_id for e in events if e.kind == "state" and e.state == "running")
    finishes = Counter(e.job_id for e in events if e.kind == "state" and e.state == "succeeded")
    trainer_starts = {job_id: sum(line.startswith("start ") for line in
                                  (run_dir_for(plane, tenant, job_id) / "trainer" / "steps.log").read_text().splitlines())
                      for job_id, tenant in jobs.items()}
    records = [json.loads(p.read_text()) for p in runs_dir.glob("*.json")]
    assert starts == {j: 1 for j in jobs} and finishes == {j: 1 for j in jobs}, (starts, finishes)
    assert attempts == {j: 1 for j in jobs} and adapters == {j: 1 for j in jobs}
    assert trainer_starts == {j: 1 for j in jobs} and sorted(r["job"] for r in records) == sorted(jobs)
    assert {r["node"] for r in records} == {n.node_id for n in two_nodes.nodes.values()}, "the runs did not use both nodes"

    # Quotas, from the record: a job counts against its tenant from its admission to its end. The events' `at` is
    # the writer's clock (an admission is stamped with its tick's start, which can precede the commit of the end
    # that freed the slot), so the record is read in commit order: SQLite serialises writers, and event ids are
    # that order.
    admitted_seq = {e.job_id: e.id for e in events if e.kind == "state" and e.state == "admitted"}
    ended_seq = {e.job_id: e.id for e in events if e.kind == "state" and e.state == "succeeded"}
    peak = {t: _max_overlap([(admitted_seq[j], ended_seq[j]) for j, tj in jobs.items() if tj == t]) for t in WEIGHTS}
    run_peak = {t: _max_overlap([(r["start"], r["end"]) for r in records if r["tenant"] == t]) for t in WEIGHTS}
    total_peak = _max_overlap([(admitted_seq[j], ended_seq[j]) for j in jobs])
    for tenant, quota in QUOTAS.items():
        assert peak[tenant] <= quota and run_peak[tenant] <= quota and sampled[tenant] <= quota, (tenant, peak, run_peak, sampled)
    assert peak["a"] == QUOTAS["a"], f"a's quota of 2 was never reached, so nothing tested it: {peak}"
    assert total_peak <= CAPACITY and sampled_total <= CAPACITY

    # Weighted order: every prefix of the completions within PREFIX_BOUND jobs of each tenant's weight share.
    order = [jobs[j] for j in sorted(jobs, key=lambda j: ended_seq[j])]
    deviation = prefix_deviation(order, WEIGHTS)
    assert deviation <= PREFIX_BOUND, f"completion order {''.join(order)} strays {deviation:.1f} jobs from the weights"
    fault_figure(killed=None, requests_failed=None, jobs_lost=0, jobs_duplicated=0, recovery_s=None,
                 jobs=20, tenants=5, wall_s=round(wall_s, 1), completion_order="".join(order),
                 max_prefix_deviation=round(deviation, 2), peak_active=peak, quotas=QUOTAS, peak_total=total_peak)
