"""The attempt's sink travels light: a Ray Train controller and each Train worker unpickle it (inside the progress
callback and the worker config) before the run's first step, and only its first write imports the database.

Importing `cluster.runner` there cost each of them 0.7-0.8 s of the path to step 1 on this 2-core machine
(BENCHMARKS, "time to first step"). The probe runs in a fresh interpreter, as those processes are.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from tests.cluster.conftest import submit_simple

DATABASE_MODULES = ("sqlalchemy", "cluster.db", "cluster.service", "cluster.runner", "cluster.quotas")

PROBE = """
import json, pickle, sys
callback = pickle.loads(bytes.fromhex(sys.argv[1]))
before = [m for m in {modules!r} if m in sys.modules]
callback.sink.heartbeat()  # fenced on attempt 1 of a queued job: matches no row
after = [m for m in {modules!r} if m in sys.modules]
print(json.dumps({{"before": before, "after": after, "lost": callback.sink.should_stop()}}))
"""


def test_an_unpickled_sink_imports_the_database_at_its_first_write_only(plane):
    from cluster.progress_sink import ProgressSink
    from tune.progress import JobProgressCallback

    plane.create_tenant("alice")
    job = submit_simple(plane, "alice")
    callback = JobProgressCallback(ProgressSink(plane.settings, job.id, "alice", attempt=1))
    probe = PROBE.format(modules=DATABASE_MODULES)
    result = subprocess.run([sys.executable, "-c", probe, pickle.dumps(callback).hex()], capture_output=True, text=True,
                            timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    # The control: the write did reach the database (and learnt the attempt does not own the row), so the probe
    # sees the modules once they are imported.
    assert {"sqlalchemy", "cluster.db", "cluster.service", "cluster.quotas"} <= set(seen["after"])
    assert seen["lost"] is True


def test_the_sink_is_the_one_cluster_runner_names():
    import cluster.progress_sink
    import cluster.runner

    assert cluster.runner.ProgressSink is cluster.progress_sink.ProgressSink
