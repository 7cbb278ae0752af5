"""One local Serve application for the whole package, on the session's Ray (`ray_cluster`): a fresh control
plane (SQLite + local store) with five tenants, their keys and published adapters.

The generator is deliberately small: 2 adapter slots (Serve's multiplexing LRU) and a host cache of 2.5
adapters' bytes, so cycling three adapters evicts in both tiers.
"""

from __future__ import annotations

import io
import os
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from tests.serve.adapters import publish, write_adapter

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "ct2i"
ADAPTER_SLOTS = 2
TENANTS = ("t1", "t2", "t3", "t4")
LIMITED_TENANT = "slow"
LIMITED_RPM = 3
STEPS = 3
SIDE = 64


@dataclass
class Serving:
    base_url: str
    plane: ControlPlane
    settings: ControlPlaneSettings
    keys: dict[str, str]  # tenant → API key
    adapters: dict[str, str]  # tenant → adapter id of `<tenant>/pets` v1
    adapter_dirs: dict[str, Path]  # adapter id → its published folder's source
    cache_bytes: int
    work: Path
    references: dict = field(default_factory=dict)

    def client(self, tenant: str | None = None, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def generator_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("Generator", app_name=APP_NAME).stats.remote().result(timeout_s=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/healthz did not answer within {timeout_s} s")


@contextlib.contextmanager
def asgi_on_loopback(app):
    """`app` served by uvicorn on a free loopback port, on a thread, until the block ends; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="package")
def serving(tmp_path_factory, ray_cluster) -> Serving:
    from ray import serve

    from causalt2i.adapter import load_adapter
    from serve.app import build_app

    started = time.perf_counter()
    work = tmp_path_factory.mktemp("serving")
    settings = ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                    artifacts_uri=str(work / "artifacts"), capacity_gpus=1)
    plane = ControlPlane.open(settings)
    probe = write_adapter(work / "adapters" / "probe", tenant="probe", name="probe", seed=0)
    keys: dict[str, str] = {}
    adapters: dict[str, str] = {}
    dirs: dict[str, Path] = {}
    for index, tenant in enumerate((*TENANTS, LIMITED_TENANT)):
        plane.create_tenant(tenant, Quotas(generate_rpm=LIMITED_RPM if tenant == LIMITED_TENANT else 100_000))
        keys[tenant] = plane.create_key("tenant", tenant).key
        source = write_adapter(work / "adapters" / tenant, tenant=tenant, name="pets", seed=index + 1)
        adapters[tenant] = publish(plane, tenant, "pets", source)
        dirs[adapters[tenant]] = source
    cache_bytes = int(load_adapter(probe).nbytes * 2.5)
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={"cache_bytes": cache_bytes,
                                                                                      "max_adapters": ADAPTER_SLOTS})})
    plane.settings = settings
    print(f"adapters published in {time.perf_counter() - started:.1f} s")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"serve up in {time.perf_counter() - started:.1f} s")
        serve.run(build_app(settings, batch_wait_s=0.02,
                            generator_options={"ray_actor_options": {"num_cpus": 1, "num_gpus": 0}, "health_check_timeout_s": 120},
                            ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}),
                  name=APP_NAME, route_prefix="/")
        print(f"app running in {time.perf_counter() - started:.1f} s")
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        print(f"serving fixture ready in {time.perf_counter() - started:.1f} s")
        yield Serving(base_url=base_url, plane=plane, settings=settings, keys=keys, adapters=adapters, adapter_dirs=dirs,
                      cache_bytes=cache_bytes, work=work)
    finally:
        serve.shutdown()


class References:
    """Images from direct `causalt2i` generation (no Serve) with a given adapter and seed: the expected pixels."""

    def __init__(self, serving: Serving):
        import torch

        from causalt2i.generation import Generator
        from causalt2i.models import load_sdxl

        self.serving = serving
        torch.set_num_threads(1)  # as in the replica (num_cpus=1), so float reductions run in the same order
        self.generator = Generator(load_sdxl("tiny"))
        self._adapters: dict = {}
        self._images: dict = {}

    def image(self, adapter_id: str | None, seed: int, prompt: str, steps: int = STEPS, side: int = SIDE,
              guidance: float = 5.0) -> np.ndarray:
        from causalt2i.adapter import load_adapter

        key = (adapter_id, seed, prompt, steps, side, guidance)
        if key not in self._images:
            adapter = None
            if adapter_id is not None:
                if adapter_id not in self._adapters:
                    self._adapters[adapter_id] = load_adapter(self.serving.adapter_dirs[adapter_id])
                adapter = self._adapters[adapter_id]
            self.generator.use(adapter)
            result = self.generator({"prompt": prompt, "steps": steps, "width": side, "height": side, "seed": seed,
                                     "guidance": guidance})
            self._images[key] = result.pixels[0].permute(1, 2, 0).numpy()
        return self._images[key]


@pytest.fixture(scope="package")
def references(serving) -> References:
    return References(serving)


def png_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
