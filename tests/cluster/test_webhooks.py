"""Webhooks: the target check (every non-global form refused, the checked address pinned), Standard Webhooks
signatures checked by the `standardwebhooks` package, retries with backoff and dead letters in the database and
the API, a restart that loses nothing, and a trickling receiver that neither stalls the scheduler nor another
tenant's events, cut at the attempt's deadline."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from cluster.db import Job, Tenant
from cluster.schemas import Quotas
from cluster.service import ControlPlane, InvalidInput
from cluster.webhooks import WebhookRefused, check_webhook_url, deliver_due, deliver_next
from tests.cluster.conftest import submit_simple as _submit_simple

CPU_JOB = {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1}


def submit_simple(plane, tenant, name="pets"):
    """A CPU job: no GPU memory plan at submit (which would load the tiny base), the state events are the same."""
    return _submit_simple(plane, tenant, name=name, resources=CPU_JOB)

LOCAL = {"webhook_allow_hosts": ("127.0.0.1",), "webhook_allow_networks": ("127.0.0.1/32",)}


def _with(plane: ControlPlane, webhooks: dict | None = None, **top) -> None:
    update = dict(top)
    if webhooks:
        update["webhooks"] = plane.settings.webhooks.model_copy(update=webhooks)
    plane.settings = plane.settings.model_copy(update=update)


# -- the target check -------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "https://[2002:a9fe:a9fe::1]/",           # 6to4 of 169.254.169.254 (cloud metadata)
    "https://[2002:7f00:1::1]/",              # 6to4 of 127.0.0.1
    "https://192.0.0.192/",                   # IETF protocol assignments (192.0.0.0/24)
    "https://[::ffff:127.0.0.1]/",            # IPv4-mapped loopback
    "https://[::ffff:10.0.0.1]/",             # IPv4-mapped private
    "https://[64:ff9b::7f00:1]/",             # NAT64 of 127.0.0.1
    "https://[64:ff9b::a9fe:a9fe]/",          # NAT64 of 169.254.169.254
    "https://[64:ff9b:1::808:808]/",          # local-use NAT64
    "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo whose client is 127.0.0.1
    "https://[::7f00:1]/",                    # IPv4-compatible 127.0.0.1
    "https://169.254.169.254/latest/meta-data",
    "https://[fe80::1]/", "https://[fe80::1%25eth0]/",
    "https://localhost/hook", "https://LOCALHOST./hook", "https://127.0.0.1/hook", "https://[::1]/",
    "https://2130706433/", "https://0x7f.1/", "https://0177.0.0.1/",  # 127.0.0.1 spelled as getaddrinfo reads it
    "https://0.0.0.0/", "https://10.0.0.5/x", "https://192.168.1.1/", "https://100.64.0.1/", "https://[fc00::1]/",
    "https://224.0.0.1/", "https://[ff02::1]/", "https://240.0.0.1/", "https://[fd00:ec2::254]/",
    "https://metadata.google.internal/", "http://93.184.216.34/", "ftp://example.com/", "https://user:pw@example.com/",
    "not a url",
])
def test_non_global_targets_are_refused(url):
    with pytest.raises(WebhookRefused):
        check_webhook_url(url)


def test_refusal_names_the_embedded_address():
    with pytest.raises(WebhookRefused, match=r"6to4 form of 127\.0\.0\.1, a loopback"):
        check_webhook_url("https://[2002:7f00:1::1]/")
    with pytest.raises(WebhookRefused, match=r"NAT64 form of 169\.254\.169\.254"):
        check_webhook_url("https://[64:ff9b::a9fe:a9fe]/")


@pytest.mark.parametrize("url, address", [
    ("https://93.184.216.34/hook", "93.184.216.34"), ("https://[2606:4700::1111]/", "2606:4700::1111"),
    ("https://[2002:5db8:d822::1]/", "2002:5db8:d822::1"),    # 6to4 of a global address
    ("https://[64:ff9b::5db8:d822]/", "64:ff9b::5db8:d822"),  # NAT64 of a global address
])
def test_global_targets_are_accepted(url, address):
    assert check_webhook_url(url).address == address


def test_allow_listed_hosts_are_still_ip_checked():
    with pytest.raises(WebhookRefused, match="loopback"):
        check_webhook_url("http://127.0.0.1:8080/hook", ("127.0.0.1",))
    with pytest.raises(WebhookRefused, match="must use https"):
        check_webhook_url("http://127.0.0.1:8080/hook", (), ("127.0.0.0/8",))
    target = check_webhook_url("http://127.0.0.1:8080/hook", ("127.0.0.1",), ("127.0.0.0/8",))
    assert (target.host, target.port, target.address) == ("127.0.0.1", 8080, "127.0.0.1")
    with pytest.raises(WebhookRefused, match="metadata"):  # never, whatever the operator allows
        check_webhook_url("https://169.254.169.254/", (), ("169.254.0.0/16",))


class _Lookups:
    """A resolver that answers `answers[n]` on its n-th lookup of `host` (the last answer after that)."""

    def __init__(self, monkeypatch, host: str, *answers: list[str]):
        self.host, self.answers, self.calls = host, answers, 0
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        if host != self.host:
            return self._real(host, port, *args, **kwargs)
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer]


def test_a_name_with_any_private_answer_is_refused(monkeypatch):
    _Lookups(monkeypatch, "mixed.example.com", ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.7, a private"):
        check_webhook_url("https://mixed.example.com/hook")


# -- receivers --------------------------------------------------------------------------------------

class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; answers `statuses` in turn (then 204)."""

    def __init__(self, statuses=()):
        self.received: list[tuple[dict, bytes, float]] = []
        self.statuses = list(statuses)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), body, time.monotonic()))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
    """Reads the request, then answers one byte every `interval` seconds; records each connection's lifetime."""

    RESPONSE = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, interval: float = 3.0):
        self.interval = interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.connections: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"opened": time.monotonic(), "closed": None}
            self.connections.append(record)
            threading.Thread(target=self._trickle, args=(conn, record), daemon=True).start()

    def _trickle(self, conn, record):
        with conn:
            try:
                conn.settimeout(5.0)
                _read_request(conn)
                for byte in self.RESPONSE:
                    # Wait out the interval, but notice at once when the client hangs up (readable, then EOF).
                    if select.select([conn], [], [], self.interval)[0] and not conn.recv(4096):
                        break
                    if self._stop.is_set():
                        break
                    conn.sendall(bytes([byte]))
            except OSError:  # the client hung up: that is the moment we record
                pass
            record["closed"] = time.monotonic()

    def close(self):
        self._stop.set()
        self.listener.close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


# -- pinning ----------------------------------------------------------------------------------------

def test_the_checked_address_is_pinned_no_second_lookup(plane, receiver, monkeypatch):
    """DNS rebinding: the name answers a global address when checked and loopback afterwards. The delivery must
    look it up once, connect to the address it checked, and still send the name as Host."""
    plane.create_tenant("acme")
    _with(plane, webhook_allow_hosts=("hooks.example.com",))
    lookups = _Lookups(monkeypatch, "hooks.example.com", ["93.184.216.34"], ["93.184.216.34"], ["127.0.0.1"])
    connected = []
    real_connect = socket.create_connection

    def create_connection(address, *args, **kwargs):
        connected.append(address[0])
        # The pinned public address stands for our receiver (no network in tests); anything else goes where it says.
        return real_connect(("127.0.0.1", address[1]) if address[0] == "93.184.216.34" else address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    plane.set_webhook("acme", f"http://hooks.example.com:{receiver.port}/hook")
    assert lookups.calls == 1
    submit_simple(plane, "acme")
    assert deliver_due(plane, now=1000.0) == 1
    assert lookups.calls == 2, "one lookup per attempt: the check's; the connection reuses its answer"
    assert connected == ["93.184.216.34"]
    headers, _, _ = receiver.received[0]
    assert headers["Host"] == f"hooks.example.com:{receiver.port}"
    assert plane.webhook_deliveries("acme")[0].outcome == "delivered"
    # The next attempt's own lookup says loopback: refused before any connection, recorded as a failure.
    submit_simple(plane, "acme", name="second")
    assert deliver_due(plane, now=1001.0) == 0
    assert connected == ["93.184.216.34"] and len(receiver.received) == 1
    last = plane.webhook_deliveries("acme")[0]
    assert last.outcome == "failed" and "refused" in last.error and "127.0.0.1" in last.error


# -- signatures -------------------------------------------------------------------------------------

def test_signed_per_standard_webhooks_and_secret_shown_once(plane, receiver):
    plane.create_tenant("acme")
    with pytest.raises(InvalidInput) as refused:
        plane.set_webhook("acme", receiver.url)  # loopback: refused unless the operator allows it
    assert refused.value.field == "url"
    _with(plane, **LOCAL)
    with pytest.raises(InvalidInput) as bad_secret:
        plane.set_webhook("acme", receiver.url, "not-base64-at-all!!")
    assert bad_secret.value.field == "secret"
    configured = plane.set_webhook("acme", receiver.url)
    secret = configured.webhook_secret
    assert secret.startswith("whsec_")
    assert "webhook_secret" not in plane.get_tenant("acme").model_dump()  # shown once, never listed again
    job = submit_simple(plane, "acme")
    plane.cancel_job("acme", job.id)
    assert deliver_due(plane, now=1000.0) == 2
    payloads = []
    for headers, body, _ in receiver.received:
        payloads.append(Webhook(secret).verify(body, headers))  # the real consumer's check
        assert headers["webhook-id"].startswith("evt_") and headers["webhook-signature"].startswith("v1,")
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "A" * 43 + "=").verify(body, headers)  # another secret
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body.replace(b"acme", b"acmf"), headers)  # a changed body
    assert [p["type"] for p in payloads] == ["tuning.state_changed"] * 2
    assert [p["data"]["state"] for p in payloads] == ["queued", "cancelled"]
    assert {p["data"]["job_id"] for p in payloads} == {job.id}
    # A receiver-supplied secret in the standard form is used as given.
    given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert plane.set_webhook("acme", receiver.url, given).webhook_secret == given


# -- retries, backoff, dead letters, restarts -------------------------------------------------------

def test_retries_back_off_then_dead_letter_visible_in_db_and_api(plane, db):
    failing = Receiver(statuses=[500] * 10)
    try:
        plane.create_tenant("acme")
        _with(plane, {"backoff_s": 10.0, "max_attempts": 3}, **LOCAL)
        plane.set_webhook("acme", failing.url)
        job = submit_simple(plane, "acme")
        plane.cancel_job("acme", job.id)
        assert deliver_due(plane, now=1000.0) == 0 and len(failing.received) == 1  # attempt 1: 500
        assert deliver_due(plane, now=1009.9) == 0 and len(failing.received) == 1  # inside 10 s
        assert deliver_due(plane, now=1010.0) == 0 and len(failing.received) == 2  # attempt 2
        assert deliver_due(plane, now=1029.9) == 0 and len(failing.received) == 2  # inside 20 s (doubled)
        assert deliver_due(plane, now=1030.0) == 0 and len(failing.received) == 3  # attempt 3: dead-lettered
        failing.statuses = []  # the receiver recovers: the queue moved on to the next event
        assert deliver_due(plane, now=1030.0) == 1 and len(failing.received) == 4
        ids = [h["webhook-id"] for h, _, _ in failing.received]
        assert ids[0] == ids[1] == ids[2] != ids[3]  # the same id on every attempt of an event
        history = list(reversed(plane.webhook_deliveries("acme")))
        assert [(d.attempt, d.outcome, d.status_code) for d in history] == [
            (1, "failed", 500), (2, "failed", 500), (3, "dead_lettered", 500), (1, "delivered", 204)]
        assert [d.at for d in history] == [1000.0, 1010.0, 1030.0, 1030.0]
        with db.read() as session:
            assert "dead-lettered after 3 attempts" in session.get(Tenant, "acme").webhook_last_error
        from cluster.api import create_app

        admin = plane.create_key("admin").key
        with TestClient(create_app(plane=plane, notify=lambda _: None)) as client:
            answer = client.get("/v1/admin/tenants/acme/webhook/deliveries", params={"outcome": "dead_lettered"},
                                headers={"Authorization": f"Bearer {admin}"})
            assert answer.status_code == 200, answer.text
            assert [(d["attempt"], d["outcome"], d["msg_id"]) for d in answer.json()] == [(3, "dead_lettered", ids[0])]
            dead_event = answer.json()[0]["event_id"]
            assert client.post("/v1/admin/tenants/acme/webhook/redeliver", params={"from_event_id": dead_event},
                               headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            assert client.post("/v1/admin/tenants/acme/webhook/redeliver", params={"from_event_id": 10**9},
                               headers={"Authorization": f"Bearer {admin}"}).status_code == 404
            assert deliver_due(plane, now=1040.0) == 2  # the dead letter and the event after it, again
            assert [h["webhook-id"] for h, _, _ in failing.received[4:]] == [ids[0], ids[3]]
            tenant_key = plane.create_key("tenant", "acme").key
            assert client.get("/v1/admin/tenants/acme/webhook/deliveries",
                              headers={"Authorization": f"Bearer {tenant_key}"}).status_code == 403
    finally:
        failing.close()


def test_a_restart_loses_neither_pending_events_nor_retry_state(plane, settings):
    flaky = Receiver(statuses=[503])
    try:
        plane.create_tenant("acme")
        _with(plane, {"backoff_s": 5.0}, **LOCAL)
        plane.set_webhook("acme", flaky.url)
        submit_simple(plane, "acme")
        assert deliver_due(plane, now=1000.0) == 0  # attempt 1 fails; then the process "dies"
        reopened = ControlPlane.open(plane.settings)  # a new process: only the database carries over
        assert deliver_due(reopened, now=1004.0) == 0 and len(flaky.received) == 1  # the backoff survived
        assert deliver_due(reopened, now=1005.0) == 1
        assert [(d.attempt, d.outcome) for d in reversed(reopened.webhook_deliveries("acme"))] == [(1, "failed"), (2, "delivered")]
        # A worker that claimed an attempt and died: its lease expires, then the event goes out.
        submit_simple(reopened, "acme", name="second")
        with reopened.db.write() as session:
            session.get(Tenant, "acme").webhook_next_at = 2000.0 + 60  # what a claim at t=2000 leaves behind
        assert deliver_due(reopened, now=2030.0) == 0
        assert deliver_due(reopened, now=2060.0) == 1 and len(flaky.received) == 3
    finally:
        flaky.close()


def test_a_claimed_attempt_is_not_made_twice(plane, receiver):
    plane.create_tenant("acme")
    _with(plane, **LOCAL)
    plane.set_webhook("acme", receiver.url)
    submit_simple(plane, "acme")
    with plane.db.write() as session:  # another dispatcher holds the lease
        session.get(Tenant, "acme").webhook_next_at = 1000.0 + plane.settings.webhooks.timeout_s + 30
    assert deliver_next(plane, "acme", now=1000.0) == "idle" and receiver.received == []


# -- off the scheduler's path -----------------------------------------------------------------------

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


def _admission_s(plane, loop, tenant: str, name: str, cap: float = 30.0) -> float:
    job = submit_simple(plane, tenant, name=name)
    start = time.monotonic()
    loop.wake()
    while time.monotonic() - start < cap:
        with plane.db.read() as session:
            if session.get(Job, job.id).state != "queued":
                return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{tenant}'s job was not admitted within {cap} s")


def test_a_trickling_receiver_stalls_neither_scheduling_nor_other_tenants(plane, settings):
    """Tenant A's receiver answers one byte every 3 s. Tenant B's job is admitted in its usual time, B's events
    reach B's receiver while A's attempt hangs, and A's attempts are cut at the 3.5 s deadline, then dead-lettered."""
    from cluster.scheduler import SchedulerLoop

    deadline_s = 3.5
    trickle, fast = TricklingReceiver(interval=3.0), Receiver()
    _with(plane, {"timeout_s": deadline_s, "max_attempts": 2, "backoff_s": 0.2, "poll_s": 0.2}, capacity_gpus=64,
          scheduler=plane.settings.scheduler.model_copy(update={"tick_seconds": 0.2}), **LOCAL)
    for name in ("tenant-a", "tenant-b"):
        plane.create_tenant(name, Quotas(max_concurrent_jobs=10, max_concurrent_gpus=10))
    loop = SchedulerLoop(plane.settings, _NoopRunner())
    try:
        baseline = max(_admission_s(plane, loop, "tenant-b", f"base{n}") for n in range(3))
        plane.set_webhook("tenant-a", trickle.url)
        plane.set_webhook("tenant-b", fast.url)
        submit_simple(plane, "tenant-a", name="slow")
        loop.wake()
        assert _wait(lambda: trickle.connections, 10), "A's delivery never started"
        time.sleep(0.5)  # A's attempt is now waiting on its receiver
        started = time.monotonic()
        tick = loop.tick_now()  # the scheduler's own tick, with A's attempt hanging
        tick_s = time.monotonic() - started
        stalled = _admission_s(plane, loop, "tenant-b", "during")
        assert _wait(lambda: any(json.loads(b)["data"]["state"] == "admitted" for _, b, _ in fast.received), 5), \
            "B's events waited behind A's receiver"
        b_delivered_at = fast.received[-1][2]
        assert trickle.connections[0]["closed"] is None or b_delivered_at < trickle.connections[0]["closed"]
        print(f"\nB admission: baseline {baseline:.3f} s, with A's receiver trickling {stalled:.3f} s; tick {tick_s:.3f} s")
        assert tick_s < 1.0, tick
        assert stalled <= max(2.0, 3 * baseline), (stalled, baseline)
        # A: two attempts on its first event, each cut at the deadline, then a dead letter.
        assert _wait(lambda: any(d.outcome == "dead_lettered" for d in plane.webhook_deliveries("tenant-a")), 4 * deadline_s + 10)
        first_event = [d for d in reversed(plane.webhook_deliveries("tenant-a"))][:2]
        assert [(d.attempt, d.outcome) for d in first_event] == [(1, "failed"), (2, "dead_lettered")]
        for attempt in first_event:
            assert "deadline" in attempt.error
            assert deadline_s - 0.05 <= attempt.duration_s <= deadline_s + 1.0, attempt
        held = [c["closed"] - c["opened"] for c in trickle.connections[:2] if c["closed"] is not None]
        assert len(held) == 2 and all(deadline_s - 0.1 <= h <= deadline_s + 1.0 for h in held), held
        print(f"A's attempts held the connection {', '.join(f'{h:.2f}' for h in held)} s (deadline {deadline_s} s)")
    finally:
        trickle.close()  # its connection ends within one interval, so stop() does not wait out a whole deadline
        loop.stop()
        fast.close()


def _wait(predicate, timeout: float, every: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def _self_signed(tmp_path, name: str):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_to_the_pinned_address_keeps_the_name_for_sni_and_the_certificate(plane, tmp_path, monkeypatch):
    """Over TLS the pinned connection sends the name as SNI and checks the certificate against the name: an
    untrusted certificate fails the attempt; trusted, the event is delivered."""
    import ssl

    import cluster.webhooks as webhooks

    cert, key = _self_signed(tmp_path, "hooks.example.com")
    server_names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    receiver = Receiver()
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    try:
        _Lookups(monkeypatch, "hooks.example.com", ["93.184.216.34"])
        connected = []
        real_connect = socket.create_connection

        def create_connection(address, *args, **kwargs):
            connected.append(address[0])
            return real_connect(("127.0.0.1", address[1]) if address[0] == "93.184.216.34" else address, *args, **kwargs)

        monkeypatch.setattr(socket, "create_connection", create_connection)
        plane.create_tenant("acme")
        plane.set_webhook("acme", f"https://hooks.example.com:{receiver.port}/hook")
        submit_simple(plane, "acme")
        assert deliver_due(plane, now=1000.0) == 0  # the platform's trust store does not know this certificate
        failed = plane.webhook_deliveries("acme")[0]
        assert failed.outcome == "failed" and "CERTIFICATE_VERIFY_FAILED" in failed.error, failed
        trusting = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(webhooks, "_ssl_context", lambda: trusting)
        assert deliver_due(plane, now=1100.0) == 1
        assert connected == ["93.184.216.34", "93.184.216.34"]
        assert server_names == ["hooks.example.com", "hooks.example.com"]
        assert receiver.received[0][0]["Host"] == f"hooks.example.com:{receiver.port}"
    finally:
        receiver.close()


def test_old_attempts_are_pruned_and_the_outbox_kept(plane):
    from cluster.db import JobEvent, WebhookDelivery
    from cluster.webhooks import prune_deliveries

    plane.create_tenant("acme")
    submit_simple(plane, "acme")
    with plane.db.write() as session:
        for at in (100.0, 5000.0):
            session.add(WebhookDelivery(tenant="acme", event_id=1, msg_id="evt_1", attempt=1, at=at, duration_s=0.1,
                                        outcome="dead_lettered", error="HTTP 500"))
    assert prune_deliveries(plane, now=6000.0, keep_s=2000.0) == 1
    assert [d.at for d in plane.webhook_deliveries("acme")] == [5000.0]
    with plane.db.read() as session:
        assert session.query(JobEvent).filter_by(tenant="acme").count() > 0


def test_a_hanging_dns_lookup_is_cut_at_the_deadline(plane, monkeypatch):
    """getaddrinfo takes no timeout; the attempt's deadline still covers the lookup."""
    plane.create_tenant("acme")
    _with(plane, {"timeout_s": 1.0})
    lookups = _Lookups(monkeypatch, "slow.example.com", ["93.184.216.34"])
    plane.set_webhook("acme", "https://slow.example.com/hook")
    answer = lookups.__call__
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (time.sleep(4.0) if a[0] == "slow.example.com" else None) or answer(*a, **k))
    submit_simple(plane, "acme")
    started = time.monotonic()
    assert deliver_due(plane, now=1000.0) == 0
    elapsed = time.monotonic() - started
    attempt = plane.webhook_deliveries("acme")[0]
    assert attempt.outcome == "failed" and "deadline" in attempt.error, attempt
    assert 1.0 <= attempt.duration_s <= 1.5 and elapsed < 3.0, (attempt.duration_s, elapsed)
