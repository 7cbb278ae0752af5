"""The web console's time to interactive on loopback, in Debian's Chromium (playwright), cold and warm cache.

The real ingress app (control plane on SQLite, no generator needed) under uvicorn on 127.0.0.1; each load is a
fresh browser context (cold) or a reload (warm). Reported from the Navigation Timing entry: domInteractive and
loadEventEnd (every script has run and the handlers are attached), medians over `--loads`, plus the time until
a tenant's key has been checked and the tuning list drawn (`#whoami` filled).

    .venv/bin/python bench/bench_console.py [--loads 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main() -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from cluster.config import ControlPlaneSettings
    from cluster.service import ControlPlane
    from serve.ingress import LocalRateLimiter, create_ingress_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plane = ControlPlane.open(ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'db'}",
                                                       artifacts_uri=str(work / "artifacts"), capacity_gpus=1))
        plane.create_tenant("acme")
        key = plane.create_key("tenant", "acme").key

        async def no_generator(model_id, call):
            raise RuntimeError("not used")

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_ingress_app(plane, no_generator, limiter=LocalRateLimiter()),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        timing = "() => { const n = performance.getEntriesByType('navigation')[0]; return [n.domInteractive, n.loadEventEnd]; }"
        cold, warm, keyed = [], [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for _ in range(args.loads):
                context = browser.new_context()
                page = context.new_page()
                page.goto(url, wait_until="load")
                cold.append(page.evaluate(timing))
                page.reload(wait_until="load")
                warm.append(page.evaluate(timing))
                started = time.perf_counter()
                page.fill("#key", key)
                page.click("#connect")
                page.wait_for_selector("#whoami:has-text('tenant ')")
                keyed.append((time.perf_counter() - started) * 1000)
                context.close()
            browser.close()
        server.should_exit = True
        thread.join(5)

    def med(values, index):
        return round(statistics.median(v[index] for v in values), 1)

    print(json.dumps({"machine": f"{platform.machine()} {platform.node()}", "loads": args.loads,
                      "cold_dom_interactive_ms": med(cold, 0), "cold_load_event_end_ms": med(cold, 1),
                      "warm_dom_interactive_ms": med(warm, 0), "warm_load_event_end_ms": med(warm, 1),
                      "key_checked_ms": round(statistics.median(keyed), 1)}, indent=1))


if __name__ == "__main__":
    main()
