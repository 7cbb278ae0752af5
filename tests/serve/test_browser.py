"""A real headless Chromium (Debian's, driven by playwright) uses the web page: key, adapter, prompt, generate."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import SIDE, TENANTS, max_abs_diff, png_pixels

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                 reason="Debian's chromium is not installed (bash .ci/browser.sh installs it)")]


def test_page_generates_an_image_of_the_chosen_adapter(serving, references):
    from playwright.sync_api import sync_playwright

    tenant = TENANTS[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console = []
            page.on("console", lambda message: console.append(message.text))
            opened = page.goto(serving.base_url + "/")
            policy = opened.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
            page.fill("#key", serving.keys[tenant])
            page.click("#connect")
            page.click("#tab-use")
            page.wait_for_selector(f"#adapter option[value='{tenant}/pets@1']", state="attached", timeout=30_000)
            page.select_option("#adapter", f"{tenant}/pets@1")
            page.fill("#prompt", "a photo of <s1> cat")
            page.fill("#steps-gen", "3")
            page.fill("#guidance", "5")
            page.fill("#width", str(SIDE))
            page.fill("#height", str(SIDE))
            page.fill("#seed", "42")
            page.click("#generate")
            image = page.wait_for_selector("#images img.generated", timeout=120_000)
            source = image.get_attribute("src")
            encoded = image.get_attribute("data-b64")
            assert page.text_content("#error") == ""
            assert "seed 42" in page.text_content("#status")
            # The page works under its Content-Security-Policy: Chromium refused nothing (it logs each refusal).
            assert not [text for text in console if "Content Security Policy" in text], console
            styled = page.eval_on_selector("fieldset", "e => getComputedStyle(e).borderTopLeftRadius")
            assert styled == "6px", "/web/style.css is applied under the page's policy"
        finally:
            browser.close()
    assert source.startswith("blob:")  # the page shows the PNG it received, unchanged
    pixels = png_pixels(base64.b64decode(encoded))
    assert max_abs_diff(pixels, references.image(serving.adapters[tenant], 42, "a photo of <s1> cat")) == 0
