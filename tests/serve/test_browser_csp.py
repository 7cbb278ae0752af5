"""The web page under its Content-Security-Policy in a real headless Chromium, without Ray: the ingress app under
uvicorn with a generator that returns a fixed PNG. Chromium enforces the policy the server sends, so a script,
style or request the policy does not allow shows up as a console refusal and a page that does not work;
the full page-against-Serve flow is tests/serve/test_browser.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from serve.ingress import LocalRateLimiter, create_ingress_app
from serve.schemas import GeneratedImages
from tests.cluster.conftest import png_bytes
from tests.serve.conftest import asgi_on_loopback
from tests.serve.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                 reason="Debian's chromium is not installed (bash .ci/browser.sh installs it)")]


class PictureGenerator:
    async def __call__(self, model_id, call):
        png = png_bytes(64, (10, 200, 30))
        return GeneratedImages(pngs=[png] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                               batch_size=1, timings={"denoise": 0.01})


@pytest.fixture
def page_server(tmp_path):
    plane = ControlPlane.open(ControlPlaneSettings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                                   artifacts_uri=str(tmp_path / "artifacts"), capacity_gpus=1))
    plane.create_tenant("acme", Quotas(generate_rpm=100))
    key = plane.create_key("tenant", "acme").key
    with asgi_on_loopback(create_ingress_app(plane, PictureGenerator(), limiter=LocalRateLimiter())) as base_url:
        yield base_url, key


def test_the_page_works_under_its_policy_and_chromium_refuses_nothing(page_server):
    from playwright.sync_api import Error as PlaywrightError, sync_playwright

    base_url, key = page_server
    refusals: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: refusals.append(message.text) if "Content Security Policy" in message.text else None)
            opened = page.goto(base_url + "/")
            assert "script-src 'self';" in opened.headers["content-security-policy"]
            assert opened.headers["x-frame-options"] == "DENY"
            assert page.eval_on_selector("fieldset", "e => getComputedStyle(e).borderTopLeftRadius") == "6px", \
                "/web/style.css applies: the policy allows the page's own files"
            page.fill("#key", key)
            page.click("#connect")
            page.click("#tab-use")
            page.fill("#prompt", "a cat")
            page.fill("#steps-gen", "2")
            page.click("#generate")
            image = page.wait_for_selector("#images img.generated", timeout=30_000)
            assert image.get_attribute("src").startswith("blob:")
            page.wait_for_function("() => { const e = document.querySelector('#images img.generated'); return e.complete && e.naturalWidth === 64; }",
                                   timeout=30_000)  # the blob: image is allowed by img-src and rendered
            assert page.text_content("#error") == ""
            # An inline script injected into the page is refused: the policy does its job, not only exists.
            with pytest.raises(PlaywrightError, match="Content Security Policy"):
                page.add_script_tag(content="window.__injected = true")
            assert page.evaluate("window.__injected === undefined")
        finally:
            browser.close()
    assert all("inline script" in text for text in refusals), f"only the injected script may be refused: {refusals}"
