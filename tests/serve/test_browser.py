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
            page.goto(serving.base_url + "/")
            page.fill("#key", serving.keys[tenant])
            page.click("#connect")
            page.wait_for_selector(f"#adapter option[value='{tenant}/pets@1']", state="attached", timeout=30_000)
            page.select_option("#adapter", f"{tenant}/pets@1")
            page.fill("#prompt", "a photo of <s1> cat")
            page.fill("#steps", "3")
            page.fill("#guidance", "5")
            page.fill("#width", str(SIDE))
            page.fill("#height", str(SIDE))
            page.fill("#seed", "42")
            page.click("#generate")
            image = page.wait_for_selector("#images img.generated", timeout=120_000)
            source = image.get_attribute("src")
            assert page.text_content("#error") == ""
            assert "seed 42" in page.text_content("#status")
        finally:
            browser.close()
    assert source.startswith("data:image/png;base64,")
    pixels = png_pixels(base64.b64decode(source.split(",", 1)[1]))
    assert max_abs_diff(pixels, references.image(serving.adapters[tenant], 42, "a photo of <s1> cat")) == 0
