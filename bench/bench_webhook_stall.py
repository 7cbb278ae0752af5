"""The webhook-stall figure (issue 13): how long another tenant's job waits for admission while one tenant's
webhook receiver trickles its answer, one byte every 3 s.

    .venv/bin/python bench/bench_webhook_stall.py [--interval 3] [--cap 240] [--json]

Run it inside `/work/bin/iso NAME` (it opens a receiver on 127.0.0.1). The scheduler is the real
`SchedulerLoop` (a thread ticking every `tick_seconds`, woken on submit as the API does) with a runner that
launches nothing, on SQLite. Phases, side by side in one run:

1. baseline: no webhook anywhere; tenant B submits, time until its job is `admitted`;
2. stalled: tenant A's webhook points at the trickling receiver; A submits; once A's delivery has opened its
   connection, B submits; time until B's job is `admitted` (cut at --cap seconds).

It also reports how long each connection to the trickling receiver stayed open (the delivery's deadline).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import ControlPlaneSettings  # noqa: E402

RESPONSE = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


def _read_request(conn: socket.socket) -> bytes:
    """The whole request (headers, then Content-Length bytes of body), so that what follows is only EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class TricklingReceiver:
    """Accepts webhook POSTs and answers one byte every `interval` seconds; records each connection's lifetime."""

    def __init__(self, interval: float):
        self.interval = interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"opened": time.monotonic(), "closed": None, "bytes_sent": 0}
            self.connections.append(record)
            threading.Thread(target=self._trickle, args=(conn, record), daemon=True).start()

    def _trickle(self, conn: socket.socket, record: dict) -> None:
        with conn:
            conn.settimeout(5.0)
            try:
                _read_request(conn)
            except OSError:
                pass
            try:
                for byte in RESPONSE:
                    # Wait out the interval, but notice at once when the client hangs up (readable, then EOF).
                    if select.select([conn], [], [], self.interval)[0] and not conn.recv(4096):
                        break
                    if self._stop.is_set():
                        break
                    conn.sendall(bytes([byte]))
                    record["bytes_sent"] += 1
                else:  # all sent: wait for the client to hang up (or give up waiting)
                    conn.settimeout(30.0)
                    while conn.recv(1):
                        pass
            except OSError:
                pass
            record["closed"] = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


class _NoopRunner:
    kind = "noop"

    def launch(self, settings, request):
        return request

    def poll(self, handle):
        return None

    def cancel(self, handle, *, force=False):
        pass

    def sweep(self, settings, tracked):
        return []


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(tenant: str) -> dict:
    return {"tenant": tenant, "name": "pets", "base_model": "tiny",
            "subjects": [{"token": "<s1>", "class_word": "cat", "images": ["a.png"]}],
            "train": {"resolution": 64, "steps": 4},
            # A CPU job: no GPU memory plan at submit; admission and its events are the same.
            "resources": {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}}


def _state(plane, job_id: str) -> str:
    from cluster.db import Job

    with plane.db.read() as session:
        return session.get(Job, job_id).state


def _time_admission(plane, loop, tenant: str, cap: float) -> float | None:
    job = plane.submit(tenant, _spec(tenant), {"a.png": _png()})
    start = time.monotonic()
    loop.wake()
    while time.monotonic() - start < cap:
        if _state(plane, job.id) != "queued":
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def run(interval: float, cap: float) -> dict:
    from cluster.scheduler import SchedulerLoop
    from cluster.service import ControlPlane

    receiver = TricklingReceiver(interval)
    home = Path(tempfile.mkdtemp(prefix="ct2i-bench-webhook-"))
    # `webhook_allow_networks` is ignored by code that predates it (settings ignore unknown fields).
    settings = ControlPlaneSettings(home=home, database_url=f"sqlite:///{home / 'ct2i.db'}",
                                    artifacts_uri=str(home / "artifacts"), capacity_gpus=64,
                                    webhook_allow_hosts=("127.0.0.1",), webhook_allow_networks=("127.0.0.1/32",))
    plane = ControlPlane.open(settings)
    from cluster.schemas import Quotas

    for name in ("tenant-a", "tenant-b"):  # room for every job the bench submits (the runner never ends them)
        plane.create_tenant(name, Quotas(max_concurrent_jobs=100, max_concurrent_gpus=100))
    loop = SchedulerLoop(settings, _NoopRunner())
    started = time.monotonic()
    try:
        baseline = [_time_admission(plane, loop, "tenant-b", cap) for _ in range(3)]
        plane.set_webhook("tenant-a", f"http://127.0.0.1:{receiver.port}/hook")
        plane.submit("tenant-a", _spec("tenant-a"), {"a.png": _png()})
        loop.wake()
        deadline = time.monotonic() + 30
        while not receiver.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the delivery is now waiting on the receiver
        stalled = _time_admission(plane, loop, "tenant-b", cap)
        # Let A's deliveries run their course (or the cap) to measure how long each connection was held.
        end = time.monotonic() + min(cap, 150)
        while time.monotonic() < end and (not receiver.connections or receiver.connections[-1]["closed"] is None):
            time.sleep(0.1)
    finally:
        loop._stop.set()
        loop.wake()
        receiver.close()
    held = [round(c["closed"] - c["opened"], 2) for c in receiver.connections if c["closed"] is not None]
    close = getattr(loop.scheduler, "close", None)
    if close is not None:
        close()
    return {"interval_s": interval, "cap_s": cap, "baseline_admission_s": baseline,
            "stalled_admission_s": stalled, "receiver_connections": len(receiver.connections),
            "connection_held_s": held, "tick_seconds": settings.scheduler.tick_seconds,
            "deadline_s": settings.webhooks.timeout_s, "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between the receiver's bytes")
    parser.add_argument("--cap", type=float, default=420.0, help="give up waiting for B's admission after this")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.interval, args.cap)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
