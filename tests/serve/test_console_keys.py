"""The console's usage-and-keys tab and its admin view, in a real headless Chromium (Debian's, through playwright).

The page is served by the real ingress app under uvicorn (its generate routes unused here). A tenant creates a
key from the keyboard, sees its secret once, revokes it, then revokes the key the page itself uses and is asked
for another; an admin key sees two tenants' queues (jobs run by the real scheduler with a gated stand-in
trainer, so they stay running or queued while the page looks) and the GPUs in use.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster.config import ControlPlaneSettings
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from tests.cluster.conftest import png_bytes, spec_dict
from tests.cluster.fake_trainer import FakeTrainer, ThreadGate
from tests.serve.conftest import asgi_on_loopback
from tests.serve.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.serve.test_console import Browser, _shot

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                 reason="Debian's chromium is not installed (bash .ci/browser.sh installs it)")]


@dataclass
class Site:
    base_url: str
    plane: ControlPlane
    admin_key: str


class _NoGenerator:
    async def __call__(self, model_id, call):
        raise AssertionError("this page test never generates")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from serve.ingress import LocalRateLimiter, create_ingress_app

    work = tmp_path_factory.mktemp("keys-console")
    settings = ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                    artifacts_uri=str(work / "artifacts"), capacity_gpus=4)
    settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={
        "heartbeat_seconds": 0.5, "progress_write_seconds": 0.0})})
    plane = ControlPlane.open(settings)
    plane.on_change = lambda _job: None
    admin_key = plane.create_key("admin").key
    with asgi_on_loopback(create_ingress_app(plane, _NoGenerator(), limiter=LocalRateLimiter())) as base_url:
        yield Site(base_url, plane, admin_key)


def _status(site: Site, key: str) -> int:
    return httpx.get(f"{site.base_url}/v1/tunings", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_tenant_creates_a_key_sees_it_once_and_revokes_it_then_its_own(site, tmp_path):
    from playwright.sync_api import sync_playwright

    site.plane.create_tenant("acme", Quotas(max_concurrent_jobs=2, max_adapters=5))
    own = site.plane.create_key("tenant", "acme", "browser")
    started = time.perf_counter()
    with sync_playwright() as playwright:
        tab = Browser(playwright, site.base_url)
        page = tab.page
        try:
            tab.connect(own.key)
            # Keyboard only: the tab button, the label field, Enter submits.
            page.focus("#tab-account")
            page.keyboard.press("Enter")
            page.wait_for_selector("#panel-account:not([hidden]) #usage tr[data-usage='gpu_hours']", timeout=30_000)
            cells = "r => [...r.children].slice(0, 3).map(c => c.textContent)"
            assert page.eval_on_selector("#usage tr[data-usage='jobs']", cells) == ["tunings running", "0", "2 at once"]
            assert page.eval_on_selector("#usage tr[data-usage='adapters']", cells) == ["adapters", "0", "5"]
            assert page.locator("#usage tr[data-usage='gpu_hours'] meter").count() == 1
            assert page.is_hidden("#tab-admin")
            page.wait_for_selector(f"#keys tr[data-key='{own.id}']", timeout=30_000)
            assert "this page's key" in page.text_content(f"#keys tr[data-key='{own.id}']")
            unlabelled = page.evaluate("""() => [...document.querySelectorAll('#panel-account input, #panel-account button')]
                .filter(e => e.tagName === 'INPUT' ? !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                                                   : !(e.textContent.trim() || e.getAttribute('aria-label')))
                .map(e => e.id || e.outerHTML)""")
            assert unlabelled == []
            page.focus("#key-label")
            page.keyboard.type("laptop")
            page.keyboard.press("Enter")
            page.wait_for_selector("#new-key:not([hidden])", timeout=30_000)
            secret = page.input_value("#new-key-secret")
            assert secret.startswith("ct2i_")
            assert page.evaluate("document.activeElement.id") == "new-key-secret"  # focused and selected, ready to copy
            assert _status(site, secret) == 200  # the key works at once
            created = next(k for k in site.plane.list_keys("acme") if k.label == "laptop")
            page.wait_for_selector(f"#keys tr[data-key='{created.id}'][data-state='live']", timeout=30_000)
            _shot(page, tmp_path, "1-key-created")

            # Seen once: Done clears it, and nothing brings it back (the list has no secrets, a reload shows none).
            page.click("#dismiss-key")
            assert page.is_hidden("#new-key") and page.input_value("#new-key-secret") == ""
            page.reload()
            page.wait_for_selector("#whoami:has-text('tenant acme')", timeout=30_000)
            page.click("#tab-account")
            page.wait_for_selector(f"#keys tr[data-key='{created.id}']", timeout=30_000)
            assert secret not in page.content()

            # Revoke it from the keyboard: the row says so and the key is refused at once.
            page.focus(f"#keys button.revoke[data-key='{created.id}']")
            page.keyboard.press("Enter")
            page.wait_for_selector(f"#keys tr[data-key='{created.id}'][data-state='revoked']", timeout=30_000)
            assert _status(site, secret) == 401
            assert page.text_content("#keys-status") == f"revoked {created.id}"
            _shot(page, tmp_path, "2-key-revoked")

            # Revoke the key this page uses: allowed; the page forgets it and asks for a key.
            label = page.get_attribute(f"#keys button.revoke[data-key='{own.id}']", "aria-label")
            assert label.endswith("the key this page uses")
            page.click(f"#keys button.revoke[data-key='{own.id}']")
            page.wait_for_selector("#key-error:has-text('was revoked: enter another key')", timeout=30_000)
            assert page.evaluate("document.activeElement.id") == "key"
            assert page.evaluate("localStorage.getItem('ct2i.key')") is None and page.input_value("#key") == ""
            assert page.is_hidden("#panel-account")
            assert _status(site, own.key) == 401
            page.wait_for_timeout(2500)  # longer than the page's polling interval: nothing more is sent with the old key
            _shot(page, tmp_path, "3-asked-for-a-key")
        finally:
            tab.close()
    print(f"tenant keys journey: {time.perf_counter() - started:.1f} s")
    assert tab.errors == [], tab.errors
    assert tab.failed_requests == [], tab.failed_requests


def test_an_admin_key_sees_every_tenant_queue_and_the_gpus_in_use(site, tmp_path):
    from playwright.sync_api import sync_playwright

    plane = site.plane
    plane.create_tenant("north", Quotas(max_concurrent_jobs=1))
    plane.create_tenant("south")
    jobs = {}
    for tenant, name in (("north", "first"), ("north", "second"), ("south", "only")):
        jobs[name] = plane.submit(tenant, spec_dict(tenant, name), {"a.png": png_bytes()}).id
        time.sleep(0.01)
    gate = ThreadGate()  # the admitted runs wait here, so the page sees them running
    scheduler = Scheduler(plane.settings, InlineRunner(FakeTrainer(gate)), capacity_gpus=4)
    try:
        scheduler.tick()
        deadline = time.time() + 30
        while time.time() < deadline and {plane.get_job(None, jobs[n]).state for n in ("first", "only")} != {"running"}:
            time.sleep(0.05)
        with sync_playwright() as playwright:
            tab = Browser(playwright, site.base_url)
            page = tab.page
            try:
                page.fill("#key", site.admin_key)
                page.keyboard.press("Enter")  # Enter in the key field connects
                page.wait_for_selector("#whoami:has-text('admin key')", timeout=30_000)
                page.wait_for_selector("#panel-admin:not([hidden]) #tenant-queues tr[data-tenant='south'] li", timeout=30_000)
                assert page.is_hidden("#tab-create") and page.is_hidden("#tab-account") and page.is_visible("#tab-watch")
                north = page.locator("#tenant-queues tr[data-tenant='north']")
                assert north.locator("li").evaluate_all("ls => ls.map(l => l.dataset.state)") == ["running", "queued"]
                queued = north.locator(f"li[data-job='{jobs['second']}']").text_content()
                assert queued.startswith(f"second ({jobs['second']}): queued #1")
                assert "waiting: tenant at its concurrency limit: 1 of 1 jobs running" in queued
                assert page.text_content("#tenant-queues tr[data-tenant='south'] td:nth-of-type(1)") == "1 of " + str(
                    plane.get_tenant("south").max_concurrent_jobs)
                assert page.text_content("#cluster-usage tr[data-cluster='gpus'] td") == "2"
                assert page.text_content("#cluster-usage tr[data-cluster='jobs'] td") == "2 running, 1 queued"
                _shot(page, tmp_path, "admin-queue")
                # The queue follows the cluster: once the first job is cancelled, the second is admitted.
                plane.cancel_job(None, jobs["first"])
                scheduler.tick()
                page.wait_for_selector(f"#tenant-queues li[data-job='{jobs['second']}'][data-state='running']", timeout=30_000)
            finally:
                tab.close()
        assert tab.errors == [], tab.errors
        assert tab.failed_requests == [], tab.failed_requests
    finally:
        for job_id in jobs.values():
            if plane.get_job(None, job_id).state not in ("succeeded", "failed", "cancelled"):
                plane.cancel_job(None, job_id)
        gate.open()
        scheduler.tick()
        scheduler.close()
