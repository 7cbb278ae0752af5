"""Webhooks: SSRF refusal (at set time and at send time), HMAC signatures, ordered delivery, retry with backoff."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cluster.service import InvalidInput
from cluster.webhooks import WebhookRefused, check_webhook_url, deliver_due, verify_signature
from tests.cluster.conftest import submit_simple


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "https://127.0.0.1/hook", "https://localhost/hook", "https://10.0.0.5/x", "https://192.168.1.1/",
    "https://169.254.169.254/latest/meta-data", "https://[::1]/", "https://[::ffff:127.0.0.1]/", "https://0.0.0.0/",
    "https://metadata.google.internal/", "ftp://example.com/", "https://user:pw@example.com/", "not a url",
])
def test_internal_urls_are_refused(url):
    with pytest.raises(WebhookRefused):
        check_webhook_url(url)


def test_allow_listed_host_is_accepted():
    assert check_webhook_url("http://127.0.0.1:8080/hook", ("127.0.0.1",)) == ("127.0.0.1", 8080)


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        status = 500 if type(self).fail_first > 0 else 204
        type(self).fail_first -= 1
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.received = []
    _Receiver.fail_first = 1
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_signed_state_changes_delivered_in_order_with_retry(plane, receiver):
    plane.create_tenant("acme")
    with pytest.raises(InvalidInput) as refused:
        plane.set_webhook("acme", receiver)  # loopback: refused unless the operator allows the host
    assert refused.value.field == "url"
    plane.settings = plane.settings.model_copy(update={"webhook_allow_hosts": ("127.0.0.1",), "webhook_backoff_s": 10.0})
    plane.set_webhook("acme", receiver, "s3cret-s3cret-s3cret")
    job = submit_simple(plane, "acme")
    plane.cancel_job("acme", job.id)
    assert deliver_due(plane, now=1000.0) == 0  # the first POST gets a 500: back off
    assert len(_Receiver.received) == 1
    assert deliver_due(plane, now=1005.0) == 0  # still inside the 10 s backoff: nothing sent
    assert len(_Receiver.received) == 1
    assert deliver_due(plane, now=1011.0) == 2
    bodies = [json.loads(body) for _, body in _Receiver.received]
    assert [b["state"] for b in bodies] == ["queued", "queued", "cancelled"] and bodies[-1]["job_id"] == job.id
    for headers, body in _Receiver.received:
        assert verify_signature("s3cret-s3cret-s3cret", headers["X-CT2I-Signature"], body)
        assert not verify_signature("wrong-secret-wrong", headers["X-CT2I-Signature"], body)
    assert deliver_due(plane, now=2000.0) == 0  # nothing new


def test_url_checked_again_at_send_time(plane, receiver):
    plane.create_tenant("acme")
    plane.settings = plane.settings.model_copy(update={"webhook_allow_hosts": ("127.0.0.1",)})
    plane.set_webhook("acme", receiver, "s3cret-s3cret-s3cret")
    plane.settings = plane.settings.model_copy(update={"webhook_allow_hosts": ()})  # operator removed the allowance
    submit_simple(plane, "acme")
    assert deliver_due(plane, now=1000.0) == 0
    assert _Receiver.received == []
    with plane.db.read() as session:
        from cluster.db import Tenant

        assert "WebhookRefused" in session.get(Tenant, "acme").webhook_last_error
