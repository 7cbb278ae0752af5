"""The artifact store: atomic publish, sha256-verified reads, tenant-scoped names (local and an fsspec URL)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cluster.store import MANIFEST, ArtifactCorrupt, ArtifactNotFound, ArtifactStore, StorePathError


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    # fsspec's in-memory filesystem stands in for s3:// and gs:// (same code path, no network).
    return ArtifactStore(f"memory://ct2i-test-{uuid.uuid4().hex}")


def test_publish_then_read_back_verified(store):
    published = store.publish_files("acme", ("adapters", "ad-1"), {"adapter.safetensors": b"w" * 100, "manifest.json": b"{}"})
    assert published.total_bytes == 102
    assert published.uri.endswith("/tenants/acme/adapters/ad-1")
    assert store.read_file("acme", ("adapters", "ad-1"), "adapter.safetensors") == b"w" * 100
    assert store.list("acme", "adapters") == ["ad-1"]
    with pytest.raises(FileExistsError):
        store.publish_files("acme", ("adapters", "ad-1"), {"x.bin": b"1"})


def test_crash_mid_publish_leaves_no_visible_artifact(store, monkeypatch, tmp_path):
    second = tmp_path / "second.bin"
    second.write_bytes(b"b" * 10)

    class Crash(Exception):
        pass

    calls = {"n": 0}
    if store.is_local:
        original = ArtifactStore._write_local

        def crashing(path, source):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("power cut")
            return original(path, source)

        monkeypatch.setattr(ArtifactStore, "_write_local", staticmethod(crashing))
    else:
        original = store.fs.pipe_file

        def crashing(path, data, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("power cut")
            return original(path, data, **kw)

        monkeypatch.setattr(store.fs, "pipe_file", crashing)
    with pytest.raises(Crash):
        store.publish_files("acme", ("adapters", "ad-2"), {"a.bin": b"a" * 10, "b.bin": second})
    assert store.list("acme", "adapters") == []
    assert not store.exists("acme", "adapters", "ad-2")
    with pytest.raises(ArtifactNotFound):
        store.read_file("acme", ("adapters", "ad-2"), "a.bin")


def test_hard_kill_mid_publish_is_invisible_and_does_not_block_retry(tmp_path):
    # A SIGKILL leaves the hidden staging folder behind (no cleanup ran): readers never see it.
    store = ArtifactStore(str(tmp_path / "artifacts"))
    staging = Path(store.path("acme", "adapters")) / ".ad-3.tmp-deadbeef"
    staging.mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"half")
    assert store.list("acme", "adapters") == []
    assert not store.exists("acme", "adapters", "ad-3")
    store.publish_files("acme", ("adapters", "ad-3"), {"a.bin": b"whole"})
    assert store.read_file("acme", ("adapters", "ad-3"), "a.bin") == b"whole"


def test_corrupted_file_is_refused(store):
    store.publish_files("acme", ("adapters", "ad-4"), {"adapter.safetensors": b"good bytes"})
    path = f"{store.path('acme', 'adapters', 'ad-4')}/adapter.safetensors"
    if store.is_local:
        Path(path).write_bytes(b"evil bytes")  # same size, different content
    else:
        store.fs.pipe_file(path, b"evil bytes")
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        store.read_file("acme", ("adapters", "ad-4"), "adapter.safetensors")
    with pytest.raises(ArtifactCorrupt):
        store.verify("acme", "adapters", "ad-4")


def test_manifest_is_written_last_on_object_stores():
    store = ArtifactStore(f"memory://ct2i-order-{uuid.uuid4().hex}")
    written: list[str] = []
    original = store.fs.pipe_file
    store.fs.pipe_file = lambda path, data, **kw: (written.append(path.rsplit("/", 1)[1]), original(path, data, **kw))[1]
    store.publish_files("acme", ("x",), {"b.bin": b"1", "a.bin": b"2"})
    assert written[-1] == MANIFEST and sorted(written[:-1]) == ["a.bin", "b.bin"]


@pytest.mark.parametrize("bad", [
    "..", "../b", "a/../../b", "/etc/passwd", "a/b", "a\\b", "%2e%2e", "s3:", "http://evil", "file:x", "", ".hidden",
    "a\x00b", "x" * 200, "..%2f", "C:\\x",
])
def test_escaping_names_are_refused(store, bad):
    with pytest.raises(StorePathError):
        store.publish_files("acme", ("jobs", bad), {"a.bin": b"1"})
    if bad != "a/b":  # a nested file inside the artifact is fine; everything else is not
        with pytest.raises(StorePathError):
            store.publish_files("acme", ("jobs", "ok"), {bad: b"1"})
    with pytest.raises(StorePathError):
        store.read_file("acme", ("jobs", bad), "a.bin")


@pytest.mark.parametrize("bad_tenant", ["..", "Acme", "a/b", "", "a" * 41, "../other"])
def test_bad_tenant_names_are_refused(store, bad_tenant):
    with pytest.raises(StorePathError):
        store.path(bad_tenant, "x")


def test_uri_of_another_tenant_is_refused(store):
    published = store.publish_files("bob", ("adapters", "ad-9"), {"a.bin": b"1"})
    with pytest.raises(StorePathError):
        store.parse_uri(published.uri, "alice")
    assert store.parse_uri(published.uri, "bob") == ("adapters", "ad-9")


def test_delete_removes_manifest_first(store):
    store.publish_files("acme", ("adapters", "ad-5"), {"a.bin": b"1"})
    store.delete("acme", "adapters", "ad-5")
    assert not store.exists("acme", "adapters", "ad-5")
    assert store.list("acme", "adapters") == []
