"""Per-tenant webhooks: a Standard Webhooks-signed POST for each job state change, delivered off the scheduler's path.

Outbox. Events are the `job_events` rows of kind 'state' (written in the same transaction as the state change).
Each tenant row holds its queue's position: `webhook_cursor` (the last event finished with: delivered or
dead-lettered), `webhook_attempts` (attempts made on the next one) and `webhook_next_at` (not before; also the
lease of an attempt in flight). Every attempt is a `webhook_deliveries` row (outcome delivered / failed /
dead_lettered, status, error, duration, the address used). Nothing lives only in memory: a restarted dispatcher
carries on from the cursor, and an attempt cut short by a crash is retried once its lease expires.

Delivery. `WebhookDispatcher` is a thread pool owned by the scheduler process; `Scheduler.tick()` only wakes
it. Each tenant is its own queue: at most one attempt in flight per tenant (so a tenant's events arrive in
order) and tenants run side by side, so a slow receiver holds one worker, never another tenant's events.
An attempt has an overall deadline (`webhooks.timeout_s`): every connect, TLS, write and read gets only
what is left of it, so a receiver trickling a byte every few seconds is cut at the deadline. Failures retry
with exponential backoff (`backoff_s · 2^(n-1)`, at most `max_backoff_s`); after `max_attempts` the event is
dead-lettered (kept in `webhook_deliveries`) and the queue moves on.

Target check (SSRF). The host is resolved once; every address must be global (`ipaddress.is_global`) and not
multicast or 192.0.0.0/24, and every IPv4 address embedded in an IPv6 one (IPv4-mapped, 6to4, Teredo, NAT64
64:ff9b::/96) must pass the same test; IPv4-compatible (::/96) and local NAT64 (64:ff9b:1::/48) are refused.
The connection then goes to the address that was checked (no second lookup), with the original name in the
Host header and TLS SNI/certificate check. An operator may allow plain http for listed hosts
(`CT2I_WEBHOOK_ALLOW_HOSTS`) and non-global networks (`CT2I_WEBHOOK_ALLOW_NETWORKS`, e.g. an in-cluster
receiver); allow-listed hosts are still IP-checked, and cloud metadata addresses are never allowed.

Signature (https://www.standardwebhooks.com): headers `webhook-id` (stable across retries: the receiver's
idempotency key), `webhook-timestamp` (unix seconds) and `webhook-signature` =
`v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where key = base64-decode(secret without its
`whsec_` prefix). The secret is per tenant and shown once, when the webhook is set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
import weakref
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpcore
from sqlalchemy import and_, delete, exists, select, update

from cluster.db import JobEvent, Tenant, WebhookDelivery

log = logging.getLogger(__name__)

EVENT_TYPE = "tuning.state_changed"
SECRET_PREFIX = "whsec_"
METADATA_HOSTS = {"metadata.google.internal", "metadata", "metadata.azure.internal"}
# Cloud metadata services: refused even inside an operator's allowed networks.
METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
LEASE_MARGIN_S = 30.0
PRUNE_EVERY_S = 3600.0
RESPONSE_ERROR_CHARS = 300


class WebhookRefused(ValueError):
    pass


# -- the target check -------------------------------------------------------------------------------

def refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not connect to `ip`, or None if it is a global unicast address in every reading."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address (64:ff9b:1::/48)"
        embedded: list[tuple[str, ipaddress.IPv4Address]] = []
        if ip.ipv4_mapped is not None:
            embedded.append(("IPv4-mapped", ip.ipv4_mapped))
        if ip.sixtofour is not None:
            embedded.append(("6to4", ip.sixtofour))
        if ip.teredo is not None:
            embedded += [("Teredo server", ip.teredo[0]), ("Teredo client", ip.teredo[1])]
        if ip in _NAT64:
            embedded.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        for kind, v4 in embedded:
            inner = refusal(v4)
            if inner is not None:
                return f"the {kind} form of {v4}, {inner}"
        if ip in _IPV4_COMPATIBLE:
            return "an IPv4-compatible or unspecified/loopback IPv6 address (::/96)"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _IETF_PROTOCOL:
        return "an IETF protocol assignment (192.0.0.0/24)"
    if not ip.is_global:
        kind = next((name for name, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                                               ("unspecified", ip.is_unspecified), ("private", ip.is_private),
                                               ("reserved", ip.is_reserved)) if flag), "non-global")
        return f"a {kind} address"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the one address the connection must use."""

    url: str
    scheme: str
    host: str
    port: int
    target: str  # path and query
    address: str


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _resolve_within(host: str, port: int, timeout: float) -> list[str]:
    """`_resolve` bounded by `timeout`: getaddrinfo takes no timeout, so it runs in its own daemon thread (one per
    lookup, none shared: a tenant whose DNS hangs holds only its own). Raises DeadlineExceeded."""
    answer: list = []

    def lookup() -> None:
        try:
            answer.append(_resolve(host, port))
        except BaseException as err:  # handed to the caller
            answer.append(err)

    thread = threading.Thread(target=lookup, daemon=True, name="ct2i-webhook-dns")
    thread.start()
    thread.join(max(0.0, timeout))
    if not answer:
        raise DeadlineExceeded(f"resolving {host} took longer than the attempt's deadline")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


def check_webhook_url(url: str, allow_hosts: tuple[str, ...] = (), allow_networks: tuple[str, ...] = (), *,
                      resolve_timeout: float | None = None) -> WebhookTarget:
    """Refuse a URL that could reach inside the platform; resolve it once and return the address to pin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise WebhookRefused(f"not a valid URL: {err}") from None
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("https", "http") or not host:
        raise WebhookRefused("must be an https:// URL with a host")
    if parts.username or parts.password:
        raise WebhookRefused("must not carry credentials")
    if parts.scheme != "https" and host not in allow_hosts:
        raise WebhookRefused("must use https")
    if host in METADATA_HOSTS:
        raise WebhookRefused(f"{host} is a cloud metadata address")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = _resolve(host, port) if resolve_timeout is None else _resolve_within(host, port, resolve_timeout)
        except (socket.gaierror, UnicodeError) as err:
            raise WebhookRefused(f"cannot resolve {host}: {getattr(err, 'strerror', None) or err}") from None
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    networks = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip in METADATA_ADDRESSES:
            raise WebhookRefused(f"{host} resolves to {ip}, a cloud metadata address")
        reason = refusal(ip)
        if reason is not None and not any(ip.version == n.version and ip in n for n in networks):
            raise WebhookRefused(f"{host} resolves to {ip}, {reason}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(url=url, scheme=parts.scheme, host=host, port=port, target=target, address=addresses[0])


# -- signatures -------------------------------------------------------------------------------------

def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_` + base64); ValueError when it is not one."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError:
        raise ValueError("must be whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must decode to 24..64 bytes, not {len(key)}")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def event_body(event: JobEvent) -> bytes:
    """The Standard Webhooks payload shape: type, timestamp, data."""
    at = datetime.fromtimestamp(event.at, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": EVENT_TYPE, "timestamp": at,
                       "data": {"event_id": event.id, "job_id": event.job_id, "tenant": event.tenant, "state": event.state,
                                "message": event.message, "at": event.at, "details": json.loads(event.data_json or "{}")}},
                      sort_keys=True, separators=(",", ":")).encode()


# -- one attempt: the pinned connection with an overall deadline ------------------------------------

class DeadlineExceeded(httpcore.TimeoutException):
    pass


class _DeadlineStream(httpcore.NetworkStream):
    """Gives each operation only what is left of the attempt's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self._inner, self._deadline = inner, deadline

    def _left(self, timeout: float | None) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the attempt's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, self._left(timeout)), self._deadline)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked address whatever host httpcore asks for (it asks for the URL's name, which it keeps
    for the Host header and TLS), and wraps the stream in the attempt's deadline."""

    def __init__(self, host: str, address: str, deadline: float):
        self.host, self.address, self.deadline = host, address, deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        if host.lower().strip("[]") != self.host.strip("[]"):
            raise httpcore.ConnectError(f"refusing to connect to {host!r}: the checked host is {self.host!r}")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the attempt's deadline passed")
        stream = self._backend.connect_tcp(self.address, port, timeout=left if timeout is None else min(timeout, left),
                                           local_address=local_address, socket_options=socket_options)
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(self, *args, **kwargs):
        raise httpcore.ConnectError("webhooks never use unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        import httpx

        _SSL_CONTEXT = httpx.create_ssl_context()  # certifi's roots, as httpx would use
    return _SSL_CONTEXT


def post(target: WebhookTarget, body: bytes, headers: dict[str, str], *, deadline_s: float,
         deadline: float | None = None) -> int:
    """POST `body` to the pinned address of `target`; the status code. Raises on transport errors and at the deadline
    (`deadline`, a `time.monotonic()` instant, else `deadline_s` from now).

    The response body is never read: only the status line and headers, within the deadline.
    """
    deadline = time.monotonic() + deadline_s if deadline is None else deadline
    host_header = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != (443 if target.scheme == "https" else 80):
        host_header += f":{target.port}"
    url = httpcore.URL(scheme=target.scheme, host=target.host, port=target.port, target=target.target)
    request_headers = [("Host", host_header), ("Content-Type", "application/json"), ("User-Agent", "ct2i-webhooks/1"),
                       ("Content-Length", str(len(body))), ("Connection", "close"), *headers.items()]
    timeouts = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
    with httpcore.ConnectionPool(ssl_context=_ssl_context() if target.scheme == "https" else None, max_connections=1,
                                 network_backend=PinnedBackend(target.host, target.address, deadline)) as pool:
        with pool.stream("POST", url, headers=request_headers, content=body, extensions={"timeout": timeouts}) as response:
            return response.status


# -- the outbox: one attempt on one tenant's queue --------------------------------------------------

def _settings_of(plane):
    settings = plane.settings
    return settings, settings.webhooks, tuple(getattr(settings, "webhook_allow_networks", ()))


def deliver_next(plane, tenant_name: str, *, now: float) -> str:
    """Make one attempt at the tenant's next event. Returns idle | busy | delivered | retrying | dead_lettered."""
    settings, webhooks, allow_networks = _settings_of(plane)
    with plane.db.read() as session:
        tenant = session.get(Tenant, tenant_name)
        if tenant is None or not tenant.webhook_url or tenant.webhook_next_at > now:
            return "idle"
        event = session.execute(select(JobEvent).where(JobEvent.tenant == tenant_name, JobEvent.kind == "state",
                                                       JobEvent.id > tenant.webhook_cursor)
                                .order_by(JobEvent.id).limit(1)).scalar_one_or_none()
        if event is None:
            return "idle"
        url, secret, cursor, attempts = tenant.webhook_url, tenant.webhook_secret or "", tenant.webhook_cursor, tenant.webhook_attempts
        body, msg_id = event_body(event), f"evt_{event.id}"
    # Claim the queue: a lease past the deadline, taken only if nobody moved it since we read it.
    with plane.db.write() as session:
        claimed = session.execute(update(Tenant).where(
            Tenant.name == tenant_name, Tenant.webhook_cursor == cursor, Tenant.webhook_attempts == attempts,
            Tenant.webhook_next_at <= now, Tenant.webhook_url == url,
        ).values(webhook_next_at=now + webhooks.timeout_s + LEASE_MARGIN_S)).rowcount
    if claimed != 1:
        return "busy"
    attempt = attempts + 1
    status, error, address = None, None, None
    started = time.monotonic()
    deadline = started + webhooks.timeout_s  # the lookup, connect, TLS, request and status line, all together
    try:
        target = check_webhook_url(url, settings.webhook_allow_hosts, allow_networks, resolve_timeout=webhooks.timeout_s)
        address = target.address
        status = post(target, body, signed_headers(secret, msg_id, body), deadline_s=webhooks.timeout_s, deadline=deadline)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except WebhookRefused as err:
        error = f"refused: {err}"
    except httpcore.TimeoutException as err:  # every operation's timeout is what is left of the deadline
        error = f"deadline of {webhooks.timeout_s:g} s passed ({type(err).__name__})"
    except Exception as err:
        error = f"{type(err).__name__}: {err}"[:RESPONSE_ERROR_CHARS]
    duration = time.monotonic() - started
    if error is None:
        outcome = "delivered"
    elif attempt >= webhooks.max_attempts:
        outcome = "dead_lettered"
    else:
        outcome = "retrying"
    with plane.db.write() as session:
        session.add(WebhookDelivery(tenant=tenant_name, event_id=event.id, msg_id=msg_id, attempt=attempt, at=now,
                                    duration_s=duration, outcome="failed" if outcome == "retrying" else outcome,
                                    status_code=status, error=error, address=address))
        if outcome == "retrying":
            values = {"webhook_attempts": attempt, "webhook_last_error": f"event {event.id}: {error}",
                      "webhook_next_at": now + min(webhooks.max_backoff_s, webhooks.backoff_s * 2 ** (attempt - 1))}
        else:
            values = {"webhook_cursor": event.id, "webhook_attempts": 0, "webhook_next_at": 0.0}
            if error is not None:
                values["webhook_last_error"] = f"event {event.id}: dead-lettered after {attempt} attempts; last: {error}"
        # Only the queue we claimed: not one the admin has since re-pointed (set_webhook resets its state).
        session.execute(update(Tenant).where(Tenant.name == tenant_name, Tenant.webhook_cursor == cursor,
                                             Tenant.webhook_url == url).values(**values))
    return outcome


def prune_deliveries(plane, now: float, keep_s: float) -> int:
    """Forget attempts older than `keep_s` (the outbox itself, `job_events`, is untouched). Rows removed."""
    with plane.db.write() as session:
        return session.execute(delete(WebhookDelivery).where(WebhookDelivery.at < now - keep_s)).rowcount


def due_tenants(plane, now: float) -> list[str]:
    """Tenants with a webhook, an undelivered state event, and no backoff or lease in force."""
    pending = exists().where(and_(JobEvent.tenant == Tenant.name, JobEvent.kind == "state", JobEvent.id > Tenant.webhook_cursor))
    with plane.db.read() as session:
        return list(session.execute(select(Tenant.name).where(Tenant.webhook_url.is_not(None), Tenant.webhook_next_at <= now,
                                                              pending).order_by(Tenant.name)).scalars())


def deliver_due(plane, *, now: float, max_per_tenant: int = 20) -> int:
    """One synchronous pass over every due tenant (tests and tools; the scheduler uses `WebhookDispatcher`)."""
    delivered = 0
    for name in due_tenants(plane, now):
        for _ in range(max_per_tenant):
            if deliver_next(plane, name, now=now) != "delivered":
                break
            delivered += 1
    return delivered


class WebhookDispatcher:
    """Per-tenant queues drained by a thread pool; `wake()` is all the scheduler calls."""

    def __init__(self, plane, *, clock=time.time):
        self.plane = plane
        self.clock = clock
        webhooks = plane.settings.webhooks
        self.workers, self.poll_s, self.batch = webhooks.workers, webhooks.poll_s, webhooks.batch
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ct2i-webhook")
        self._in_flight: set[str] = set()
        self._futures: set[futures.Future] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.last_error: str | None = None
        self._pruned_at = float("-inf")

    def start(self) -> "WebhookDispatcher":
        if self._thread is None:
            # The thread holds the dispatcher weakly: a Scheduler dropped without close() takes its workers with it.
            self._thread = threading.Thread(target=_dispatch_loop, args=(weakref.ref(self), self._wake, self._stop),
                                            daemon=True, name="ct2i-webhook-dispatch")
            self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self, timeout: float | None = None) -> None:
        """Stop handing out work; wait up to `timeout` s for attempts in flight (each ends by its deadline)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            running = list(self._futures)
        futures.wait(running, timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _forget(self, future: futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def in_flight(self) -> set[str]:
        with self._lock:
            return set(self._in_flight)

    def dispatch(self) -> int:
        """Hand every due tenant that has no attempt in flight to a worker; the number handed out."""
        now = self.clock()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            prune_deliveries(self.plane, now, self.plane.settings.webhooks.keep_deliveries_s)
            self._pruned_at = now
        started = 0
        for name in due_tenants(self.plane, self.clock()):
            with self._lock:
                if name in self._in_flight or self._stop.is_set():
                    continue
                self._in_flight.add(name)
            future = self._pool.submit(self._drain, name)
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._forget)
            started += 1
        return started

    def _drain(self, name: str) -> None:
        try:
            for _ in range(self.batch):
                if self._stop.is_set():
                    break
                outcome = deliver_next(self.plane, name, now=self.clock())
                if outcome == "delivered":
                    self.delivered += 1
                if outcome not in ("delivered", "dead_lettered"):
                    break
        except Exception:
            log.exception("webhook delivery for %s failed", name)
        finally:
            with self._lock:
                self._in_flight.discard(name)
            self._wake.set()  # more may be due (a full batch, or a short backoff)


def _dispatch_loop(ref, wake: threading.Event, stop: threading.Event) -> None:
    while not stop.is_set():
        dispatcher = ref()
        if dispatcher is None:
            return
        try:
            dispatcher.dispatch()
            dispatcher.last_error = None
        except Exception as err:  # a database outage must not kill the dispatcher
            dispatcher.last_error = f"{type(err).__name__}: {err}"
            log.warning("webhook dispatch failed: %s", dispatcher.last_error)
        poll_s = dispatcher.poll_s
        del dispatcher
        wake.wait(poll_s)
        wake.clear()
