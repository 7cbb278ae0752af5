"""Per-tenant webhooks: an HMAC-signed POST for each job state change, retried with exponential backoff.

Delivery is an outbox over `job_events` (kind 'state'): each tenant has a cursor, the id of the last event
delivered, so deliveries survive restarts and arrive in order. After `webhook_max_attempts` failures an
event is skipped (and the error kept on the tenant) so one dead endpoint cannot wedge the stream.

SSRF: a URL whose host resolves to a loopback, private, link-local, reserved, multicast or cloud-metadata
address is refused, when it is set and again before every send (DNS may have changed). The operator can
allow listed hosts (`CT2I_WEBHOOK_ALLOW_HOSTS`); plain http is only accepted for those.

Signature: header `X-CT2I-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit

from sqlalchemy import select

from cluster.db import JobEvent, Tenant

METADATA_HOSTS = {"metadata.google.internal", "metadata", "169.254.169.254", "fd00:ec2::254"}


class WebhookRefused(ValueError):
    pass


def _address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback or ip.is_private)


def check_webhook_url(url: str, allow_hosts: tuple[str, ...] = ()) -> tuple[str, int]:
    """Refuse a URL that could reach inside the platform. Returns (host, port)."""
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
    port = port or (443 if parts.scheme == "https" else 80)
    if host in allow_hosts:
        return host, port
    if parts.scheme != "https":
        raise WebhookRefused("must use https")
    if host in METADATA_HOSTS:
        raise WebhookRefused(f"{host} is a cloud metadata address")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise WebhookRefused(f"cannot resolve {host}: {err.strerror}") from None
    for info in infos:
        address = info[4][0]
        if not _address_allowed(address):
            raise WebhookRefused(f"{host} resolves to {address}, a loopback/private/link-local/reserved address")
    return host, port


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does with `X-CT2I-Signature`."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), fields.get("v1", ""))


def deliver_due(plane, *, now: float, client=None, max_per_tenant: int = 20) -> int:
    """Send what is due for every tenant with a webhook. Returns the number of events delivered."""
    import httpx

    settings = plane.settings
    with plane.db.read() as session:
        tenants = session.execute(select(Tenant.name).where(Tenant.webhook_url.is_not(None),
                                                            Tenant.webhook_next_at <= now)).scalars().all()
    if not tenants:
        return 0
    own_client = client is None
    client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
    delivered = 0
    try:
        for name in tenants:
            for _ in range(max_per_tenant):
                outcome = _deliver_next(plane, client, name, now)
                if outcome != "delivered":
                    break
                delivered += 1
    finally:
        if own_client:
            client.close()
    return delivered


def _deliver_next(plane, client, tenant_name: str, now: float) -> str:
    settings = plane.settings
    with plane.db.read() as session:
        tenant = session.get(Tenant, tenant_name)
        if tenant is None or not tenant.webhook_url or tenant.webhook_next_at > now:
            return "idle"
        event = session.execute(select(JobEvent).where(JobEvent.tenant == tenant_name, JobEvent.kind == "state",
                                                       JobEvent.id > tenant.webhook_cursor)
                                .order_by(JobEvent.id).limit(1)).scalar_one_or_none()
        if event is None:
            return "idle"
        url, secret, attempts = tenant.webhook_url, tenant.webhook_secret or "", tenant.webhook_attempts
        body = json.dumps({"type": "tuning.state_changed", "event_id": event.id, "job_id": event.job_id,
                           "tenant": tenant_name, "state": event.state, "message": event.message,
                           "at": event.at, "data": json.loads(event.data_json or "{}")}, sort_keys=True).encode()
    error = None
    try:
        check_webhook_url(url, settings.webhook_allow_hosts)
        timestamp = int(time.time())
        response = client.post(url, content=body, headers={
            "Content-Type": "application/json", "X-CT2I-Event-Id": str(event.id),
            "X-CT2I-Signature": f"t={timestamp},v1={sign(secret, timestamp, body)}"})
        if not 200 <= response.status_code < 300:
            error = f"HTTP {response.status_code}"
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    with plane.db.write() as session:
        tenant = session.get(Tenant, tenant_name)
        if tenant is None or tenant.webhook_cursor >= event.id:
            return "idle"
        if error is None:
            tenant.webhook_cursor, tenant.webhook_attempts, tenant.webhook_next_at = event.id, 0, 0.0
            return "delivered"
        attempts += 1
        tenant.webhook_last_error = f"event {event.id}: {error}"
        if attempts >= settings.webhook_max_attempts:
            tenant.webhook_cursor, tenant.webhook_attempts, tenant.webhook_next_at = event.id, 0, 0.0
            return "skipped"
        tenant.webhook_attempts = attempts
        tenant.webhook_next_at = now + settings.webhook_backoff_s * 2 ** (attempts - 1)
        return "retrying"
