"""The tenant's web console in a real headless Chromium (Debian's, driven by playwright), on the tiny preset.

The page is served by the real ingress app (`serve.ingress.create_ingress_app`: the control plane's routes and
the generate routes) under uvicorn; tunings run through the real scheduler (`SchedulerLoop`) with the real
trainer in a thread (`InlineRunner`); generation is the serving engine (`serve.generator.GeneratorEngine`) on
the tiny base, called in-process instead of through Ray Serve, so that no Ray session is needed (the Serve
path is what `test_browser.py` drives). Screenshots of each stage go to the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.runner import InlineRunner
from cluster.schemas import Quotas
from cluster.scheduler import SchedulerLoop
from cluster.service import ControlPlane
from tests.serve.conftest import asgi_on_loopback
from tests.serve.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                 reason="Debian's chromium is not installed (bash .ci/browser.sh installs it)")]

TENANT, OTHER = "acme", "rival"
STEPS = 4  # previews at steps 2 and 4 (checkpoint_every is capped at the steps; preview_every 2)


@dataclass
class Console:
    base_url: str
    plane: ControlPlane
    keys: dict[str, str]


def _generate_fn(plane: ControlPlane):
    """The generator deployment's `generate`, in this process: check against the adapter's tokens, then run."""
    import torch

    from causalt2i.models import load_sdxl
    from serve.generator import GeneratorEngine, local_adapter_locator, refusal_for
    from serve.schemas import BASE_MODEL_REF, GeneratedImages

    torch.set_num_threads(1)
    engine = GeneratorEngine(load_sdxl("tiny"), cache_bytes=64 << 20, locate=local_adapter_locator(plane))

    def work(model_id, call):
        adapter_id = None if model_id == BASE_MODEL_REF else model_id
        try:
            adapter = engine.adapter(adapter_id)
            request = engine.check(call.request, adapter.manifest.tokens if adapter is not None else ())
        except Exception as err:
            return refusal_for(err)
        outcomes, timings = engine.run(adapter_id, [request])
        if isinstance(outcomes[0], Exception):
            return refusal_for(outcomes[0])
        width, height = request.size(engine.parts)
        return GeneratedImages(pngs=outcomes[0], seeds=request.image_seeds(), width=width, height=height, batch_size=1,
                               timings=timings)

    async def generate(model_id, call):
        return await asyncio.to_thread(work, model_id, call)

    return generate


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from serve.ingress import LocalRateLimiter, create_ingress_app

    work = tmp_path_factory.mktemp("console")
    settings = ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                    artifacts_uri=str(work / "artifacts"), capacity_gpus=1)
    settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={
        "tick_seconds": 0.3, "heartbeat_seconds": 0.5, "progress_write_seconds": 0.0})})
    plane = ControlPlane.open(settings)
    keys = {}
    for tenant in (TENANT, OTHER):
        plane.create_tenant(tenant, Quotas(generate_rpm=1000))
        keys[tenant] = plane.create_key("tenant", tenant).key
    loop = SchedulerLoop(settings, InlineRunner())  # the real trainer (`local_train_fn`) in a thread
    plane.on_change = lambda job_id: loop.wake()
    try:
        with asgi_on_loopback(create_ingress_app(plane, _generate_fn(plane), limiter=LocalRateLimiter())) as base_url:
            yield Console(base_url, plane, keys)
    finally:
        loop._stop.set()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, list[Path]]:
    """Two subjects' photos (a reddish and a bluish one, 96 px), one too small, one not an image."""
    import numpy as np

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"cat": [], "dog": []}
    for subject, tint in (("cat", (180, 60, 40)), ("dog", (40, 70, 180))):
        for index in range(2):
            pixels = np.clip(rng.normal(0, 30, (96, 96, 3)) + tint, 0, 255).astype("uint8")
            path = root / f"{subject}-{index}.png"
            Image.fromarray(pixels).save(path)
            out[subject].append(path)
    Image.new("RGB", (32, 32), "green").save(root / "tiny-thumb.png")
    (root / "notes.txt").write_text("not a photo")
    out["small"] = [root / "tiny-thumb.png"]
    out["text"] = [root / "notes.txt"]
    return out


class Browser:
    """One Chromium page that records console errors and uncaught exceptions."""

    def __init__(self, playwright, base_url: str):
        self.browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        self.context = self.browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.failed_requests: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda err: self.errors.append(f"uncaught: {err}"))
        self.page.on("response", lambda r: self.failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        self.page.goto(base_url + "/")

    def connect(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#connect")
        self.page.wait_for_selector("#whoami:has-text('tenant ')", timeout=30_000)

    def close(self) -> None:
        self.browser.close()


def _shot(page, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def _fill_subjects(page, photos, first: list[Path], second: list[Path]) -> None:
    page.fill("#job-name", "pets")
    page.set_input_files("#photos-1", [str(p) for p in first])
    page.fill("#class-1", "cat")
    page.set_input_files("#photos-2", [str(p) for p in second])
    page.fill("#class-2", "dog")
    page.select_option("#preset", "quick")
    page.select_option("#mode", "lora")
    page.click("details:has(#steps) summary")
    page.fill("#steps", str(STEPS))
    page.fill("#preview-every", "2")


def test_a_tenant_tunes_two_subjects_watches_and_generates_in_the_browser(console, photos, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screenshots"
    with sync_playwright() as playwright:
        tab = Browser(playwright, console.base_url)
        page = tab.page
        try:
            tab.connect(console.keys[TENANT])
            _fill_subjects(page, photos, photos["cat"], photos["dog"])
            # The suggested tokens follow the class words; the spec shown is the one sent.
            assert page.input_value("#token-1") == "<c1>" and page.input_value("#token-2") == "<d2>"
            spec_text = page.text_content("#spec-preview")
            assert '"tenant": "acme"' in spec_text and '"steps": 4' in spec_text and '"param_mode": "lora"' in spec_text
            assert "s1-1-cat-0.png" in spec_text and "s2-2-dog-1.png" in spec_text
            assert '"evaluation": {' in spec_text  # evaluated when it ends (the box is checked by default)
            page.click("#submit")
            page.wait_for_function("""() => document.getElementById('submit-status').textContent.startsWith('submitted')
                || [...document.querySelectorAll('#create-form .error')].some(e => e.textContent)""", timeout=60_000)
            refusals = page.eval_on_selector_all("#create-form .error", "es => es.map(e => e.textContent).filter(Boolean)")
            assert refusals == [], (refusals, tab.errors)
            _shot(page, shots, "1-create")

            # Watching: the waiting reason or the progress, then previews as they arrive, then the result.
            page.wait_for_selector("#job-detail:not([hidden])", timeout=30_000)
            page.wait_for_function("""() => {
                const wait = document.getElementById('job-wait').textContent;
                return wait.startsWith('waiting') || document.getElementById('job-progress').value > 0; }""", timeout=120_000)
            _shot(page, shots, "2-waiting-or-progress")
            page.wait_for_selector("#previews img.preview[src^='blob:']", timeout=300_000)
            _shot(page, shots, "3-first-preview")
            page.wait_for_selector("#job-state[data-state='succeeded']", timeout=300_000)
            page.wait_for_selector("#report-metrics", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#previews tbody tr').length === 2", timeout=60_000)
            # The evaluation published with the adapter: its metrics and report.png, as the registry holds them.
            page.wait_for_selector("#eval-report[src^='blob:']", timeout=60_000)
            assert page.locator("#eval-metrics tr[data-metric='clip_t']").count() == 1
            shown = page.evaluate("""async () => { const img = document.getElementById('eval-report');
                await img.decode(); return [img.naturalWidth, img.naturalHeight]; }""")
            assert shown[0] > 64 and shown[1] > 64, shown
            _shot(page, shots, "4-report")
            assert page.text_content("#job-progress-text").startswith(f"{STEPS}/{STEPS}")
            assert "final_loss" in page.text_content("#report-metrics")
            headers = page.eval_on_selector_all("#previews thead th", "cells => cells.map(c => c.textContent)")
            assert headers == ["step", "a <c1> cat and a <d2> dog", "a <c1> cat", "a <d2> dog"]
            assert page.eval_on_selector_all("#previews tbody th", "cells => cells.map(c => c.textContent)") == ["2", "4"]
            assert page.is_visible("#loss-chart") and page.text_content("#loss-legend").startswith("■ loss")
            assert page.locator("#diagnostics tr[data-key='cos_margin']").count() == 1

            # Generate with both subjects' tokens, inserted by their chips.
            page.click("#report button:has-text('Generate with it')")
            page.wait_for_selector("#chips .chip[data-token='<d2>']", timeout=30_000)
            page.fill("#prompt", "")
            page.click("#chips .chip[data-token='<c1>']")
            page.click("#chips .chip[data-token='<d2>']")
            assert page.input_value("#prompt") == "a <c1> cat and a <d2> dog"
            page.fill("#steps-gen", "3")
            page.fill("#seed", "7")
            page.fill("#n", "2")
            page.click("#generate")
            page.wait_for_selector("#images img.generated[src^='blob:']", timeout=120_000)
            assert page.locator("#images img.generated").count() == 2
            assert page.text_content("#error") == ""
            assert page.locator("#gallery figure").count() == 2
            _shot(page, shots, "5-generated")

            # Download the adapter's weights: the bytes the registry holds.
            with page.expect_download() as download:
                page.click("#downloads button[data-file='adapter.safetensors']")
            saved = tmp_path / "downloaded.safetensors"
            download.value.save_as(saved)
            adapter = console.plane.list_adapters(TENANT)[0]
            assert saved.read_bytes() == console.plane.adapter_file(TENANT, adapter.id, "adapter.safetensors")
            # ...and its diffusers export: the zip the export route makes, with the LoRA file diffusers loads.
            with page.expect_download() as exported:
                page.click("#downloads button[data-export='diffusers']")
            archive_path = tmp_path / "export.zip"
            exported.value.save_as(archive_path)
            import zipfile

            with zipfile.ZipFile(archive_path) as archive:
                names = set(archive.namelist())
            assert {"README.md", "pytorch_lora_weights.safetensors"} <= names, names
            _shot(page, shots, "6-downloaded")

            # The gallery survives a reload (localStorage).
            page.reload()
            page.click("#tab-use")
            assert page.locator("#gallery figure").count() == 2
        finally:
            print("console errors:", tab.errors, "failed requests:", tab.failed_requests)
            tab.close()
    assert tab.errors == [], tab.errors
    assert tab.failed_requests == [], tab.failed_requests
    for name in ("1-create", "2-waiting-or-progress", "3-first-preview", "4-report", "5-generated", "6-downloaded"):
        assert (shots / f"{name}.png").stat().st_size > 1000
    print(f"screenshots in {shots}")

    # Another tenant's key, in a fresh browser: none of the first tenant's tunings, previews, adapters or images.
    job = console.plane.list_jobs(TENANT)[0]
    with sync_playwright() as playwright:
        rival = Browser(playwright, console.base_url)
        page = rival.page
        try:
            rival.connect(console.keys[OTHER])
            page.click("#tab-watch")
            page.wait_for_selector("#tunings td:has-text('no tunings yet')", timeout=30_000)
            page.click("#tab-use")
            assert page.eval_on_selector_all("#adapter option", "o => o.map(x => x.value)") == ["base"]
            assert page.locator("#gallery figure").count() == 0
            statuses = page.evaluate("""async (jobId) => {
                const auth = {headers: {Authorization: 'Bearer ' + document.getElementById('key').value}};
                const paths = ['/v1/tunings/' + jobId, '/v1/tunings/' + jobId + '/previews',
                               '/v1/tunings/' + jobId + '/previews/2/00.png'];
                return Promise.all(paths.map(p => fetch(p, auth).then(r => r.status)));
            }""", job.id)
            assert statuses == [404, 404, 404]
            _shot(page, shots, "7-other-tenant")
        finally:
            rival.close()


@pytest.mark.parametrize("bad", ["small", "text"])
def test_a_refused_photo_is_named_next_to_its_subject_and_nothing_is_stored(console, photos, tmp_path, bad):
    from playwright.sync_api import sync_playwright

    before = console.plane.list_jobs(OTHER)
    stored = sorted(p for p in Path(console.plane.store.path(OTHER)).rglob("*")) if Path(console.plane.store.path(OTHER)).exists() else []
    with sync_playwright() as playwright:
        tab = Browser(playwright, console.base_url)
        page = tab.page
        try:
            tab.connect(console.keys[OTHER])
            # Every control has a label (or an aria-label), and the drop zone opens the file picker from the keyboard.
            unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.outerHTML)""")
            assert unlabelled == []
            # (Counted on the input: playwright's file-chooser event proved unreliable after an earlier browser in
            # the same process.)
            page.evaluate("""() => { window.pickerOpened = 0;
                document.getElementById('photos-1').addEventListener('click', () => { window.pickerOpened++; }); }""")
            page.focus("#subjects .subject:first-of-type .drop")
            page.keyboard.press("Enter")
            page.wait_for_function("window.pickerOpened === 1", timeout=10_000)
            _fill_subjects(page, photos, photos["cat"], [photos["dog"][0], photos[bad][0]])
            page.click("#submit")
            error = page.wait_for_selector("#err-photos-2:not(:empty)", timeout=30_000)
            message = error.text_content()
            _shot(page, tmp_path, f"refused-{bad}")
            assert message.startswith(photos[bad][0].name + ":"), message
            assert ("too small" in message) if bad == "small" else ("JPEG, PNG or WebP" in message), message
            assert page.text_content("#err-photos-1") == "" and page.text_content("#err-form") == ""
            assert page.get_attribute("#photos-2", "aria-invalid") == "true"
            assert page.locator(f"#subjects li.refused[data-name='{photos[bad][0].name}']").count() == 1
        finally:
            tab.close()
    assert console.plane.list_jobs(OTHER) == before
    after = sorted(p for p in Path(console.plane.store.path(OTHER)).rglob("*")) if Path(console.plane.store.path(OTHER)).exists() else []
    assert after == stored
    # The only failed request is the refused submission itself (Chromium logs it as "Failed to load resource").
    assert [r.split(" ", 1)[0] for r in tab.failed_requests] == ["422"], tab.failed_requests
    assert all("Failed to load resource" in e for e in tab.errors), tab.errors
