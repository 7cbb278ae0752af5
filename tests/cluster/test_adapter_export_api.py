"""`GET /v1/adapters/{id}/export?format=...`: the portable exports of `causalt2i.export` over REST, tenant-scoped,
from verified files; the zip holds exactly what `ct2i export` writes for the same adapter."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient

from causalt2i.adapter import load_adapter
from causalt2i.export import export_files
from causalt2i.models import load_sdxl
from cluster.api import create_app
from tests.causalt2i.lora_adapters import write_lora_adapter
from tests.serve.adapters import publish, write_adapter


@pytest.fixture(scope="module")
def parts():
    return load_sdxl("tiny")


@pytest.fixture
def published(plane, parts, tmp_path):
    plane.create_tenant("acme")
    plane.create_tenant("rival")
    lora_dir = write_lora_adapter(tmp_path / "lora", parts, tenant="acme", name="pets", seed=3)
    full_dir = write_adapter(tmp_path / "full", tenant="acme", name="whole", seed=4)
    keys = {t: plane.create_key("tenant", t).key for t in ("acme", "rival")}
    return {"lora": (publish(plane, "acme", "pets", lora_dir), lora_dir),
            "full": (publish(plane, "acme", "whole", full_dir), full_dir)}, keys


def _zip(response) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _readable(files: dict[str, bytes]) -> dict[str, object]:
    """Each file as what a consumer reads: safetensors as (metadata, tensors), the rest as bytes. The safetensors
    writer orders the header's metadata keys arbitrarily (a Rust HashMap), so the same export differs in bytes
    between two writes while every reader sees the same file."""
    import torch
    from safetensors.torch import load

    readable = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            import json
            import struct

            header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
            tensors = load(data)
            readable[name] = (header.get("__metadata__"), {k: (v.dtype, tuple(v.shape), v.reshape(-1).view(torch.uint8).numpy().tobytes()) for k, v in tensors.items()})
        else:
            readable[name] = data
    return readable


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "embeddings"])
def test_the_export_zip_holds_exactly_what_ct2i_export_writes(plane, published, fmt):
    adapters, keys = published
    adapter_id, folder = adapters["lora"]
    client = TestClient(create_app(plane=plane, notify=lambda job_id: None))
    response = client.get(f"/v1/adapters/{adapter_id}/export", params={"format": fmt}, headers={"Authorization": f"Bearer {keys['acme']}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert f'filename="pets-v1-{fmt}.zip"' in response.headers["content-disposition"]
    assert _readable(_zip(response)) == _readable(export_files(load_adapter(folder), fmt).files)


def test_refusals_name_the_field_and_other_tenants_see_nothing(plane, published):
    adapters, keys = published
    client = TestClient(create_app(plane=plane, notify=lambda job_id: None))
    acme, rival = ({"Authorization": f"Bearer {keys[t]}"} for t in ("acme", "rival"))
    lora_id, _ = adapters["lora"]
    full_id, full_dir = adapters["full"]
    unknown = client.get(f"/v1/adapters/{lora_id}/export", params={"format": "ckpt"}, headers=acme)
    assert unknown.status_code == 422 and unknown.json()["detail"]["field"] == "format"
    # A full tune has no LoRA form until it is compressed: the refusal says so; its embeddings still export.
    as_lora = client.get(f"/v1/adapters/{full_id}/export", params={"format": "diffusers"}, headers=acme)
    assert as_lora.status_code == 422 and as_lora.json()["detail"]["field"] == "adapter", as_lora.text
    assert "compress" in as_lora.json()["detail"]["message"]
    embeddings = client.get(f"/v1/adapters/{full_id}/export", params={"format": "embeddings"}, headers=acme)
    assert embeddings.status_code == 200 and _readable(_zip(embeddings)) == _readable(export_files(load_adapter(full_dir), "embeddings").files)
    hidden = client.get(f"/v1/adapters/{lora_id}/export", params={"format": "diffusers"}, headers=rival)
    missing = client.get("/v1/adapters/ad-0000000000000000/export", params={"format": "diffusers"}, headers=rival)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["detail"]["message"].replace(lora_id, "X") == missing.json()["detail"]["message"].replace("ad-0000000000000000", "X")


def test_a_corrupt_stored_adapter_is_an_opaque_server_fault(plane, published):
    from pathlib import Path

    adapters, keys = published
    lora_id, _ = adapters["lora"]
    view = plane.get_adapter(None, lora_id)
    weights = Path(plane.store.path("acme", *plane.store.parse_uri(view.uri, "acme"))) / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    client = TestClient(create_app(plane=plane, notify=lambda job_id: None), raise_server_exceptions=False)
    response = client.get(f"/v1/adapters/{lora_id}/export", params={"format": "diffusers"}, headers={"Authorization": f"Bearer {keys['acme']}"})
    assert response.status_code == 500 and response.json()["detail"]["code"] == "artifact_corrupt"
    assert str(weights.parent) not in response.text and "correlation_id" in response.json()["detail"]


def _asgi_get(app, path: str, query: str, key: str) -> list[dict]:
    """Every ASGI message the app sends for one GET, as a server would see them (TestClient joins the body)."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    messages: list[dict] = []

    async def run():
        requested = asyncio.Event()

        async def receive():
            if not requested.is_set():
                requested.set()
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays connected until the response ends

        async def send(message):
            messages.append(message)

        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    asyncio.run(run())
    return messages


def test_the_export_is_streamed_in_pieces_and_the_archive_is_whole(plane, published):
    """The body leaves in pieces of at most ZIP_CHUNK_BYTES (+ one zip header), without a Content-Length, so no
    copy of the whole archive is built first; joined, the pieces are a valid zip of exactly the export's files."""
    from causalt2i.export import ZIP_CHUNK_BYTES

    adapters, keys = published
    adapter_id, folder = adapters["lora"]
    expected = export_files(load_adapter(folder), "diffusers")
    assert expected.nbytes > 2 * ZIP_CHUNK_BYTES, "the export must span several pieces for the check to mean anything"
    messages = _asgi_get(create_app(plane=plane, notify=lambda job_id: None), f"/v1/adapters/{adapter_id}/export",
                         "format=diffusers", keys["acme"])
    start = messages[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert "content-length" not in headers and headers["content-type"] == "application/zip"
    assert headers["content-disposition"] == 'attachment; filename="pets-v1-diffusers.zip"'
    pieces = [m["body"] for m in messages[1:] if m["type"] == "http.response.body" and m.get("body")]
    body = b"".join(pieces)
    assert len(pieces) >= expected.nbytes // ZIP_CHUNK_BYTES, len(pieces)
    assert max(map(len, pieces)) <= ZIP_CHUNK_BYTES + 1024, max(map(len, pieces))
    assert messages[-1]["type"] == "http.response.body" and not messages[-1].get("more_body", False)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None  # every member's CRC checks
        files = {name: archive.read(name) for name in archive.namelist()}
    assert _readable(files) == _readable(expected.files)
    # Tenant scoping holds for the streamed route: another tenant gets the same 404 as for no adapter at all.
    rival = _asgi_get(create_app(plane=plane, notify=lambda job_id: None), f"/v1/adapters/{adapter_id}/export",
                      "format=diffusers", keys["rival"])
    assert rival[0]["status"] == 404
