"""The artifact store: a local folder, or `s3://` / `gs://` (any fsspec URL) — the URI Ray Train uses as storage_path.

Layout: `<root>/tenants/<tenant>/<part>/<part>/...`. Every part is checked by `safe_part`, so no id or
name can leave its tenant's prefix: `..`, `/`, `\\`, absolute paths, `%`-escapes, `:` (schemes, drive
letters) and NUL are all refused.

An artifact is a folder with `_manifest.json` (each file's sha256 and size) written last:
- local: files go to a hidden temp folder beside the target, which is renamed into place (atomic);
- object stores: files are uploaded under the target and the manifest is the last PUT (single-object
  writes are atomic there), and a folder without a manifest does not exist as far as readers are concerned.
Every read verifies sha256 against the manifest and refuses a mismatch (`ArtifactCorrupt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from causalt2i.atomic import atomic_write_bytes, fsync_dir
from causalt2i.errors import FieldError

MANIFEST = "_manifest.json"
TMP_MARKER = ".tmp-"
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TENANT = re.compile(r"^[a-z0-9-]{1,40}$")


class StorePathError(FieldError):
    """A name that could escape its tenant's prefix. `field` names the input it came from."""


class ArtifactNotFound(KeyError):
    pass


class ArtifactCorrupt(ValueError):
    pass


def safe_part(value: object, field: str = "name") -> str:
    if not isinstance(value, str):
        raise StorePathError(field, "must be a string")
    if ".." in value or not _SAFE_PART.fullmatch(value):
        raise StorePathError(field, f"{value!r} is not a safe name (letters, digits, '.', '_', '-'; "
                                    "no '/', '..', ':' or '%'; at most 128 characters)")
    return value


def safe_tenant(value: object, field: str = "tenant") -> str:
    if not isinstance(value, str) or not _TENANT.fullmatch(value):
        raise StorePathError(field, f"{value!r} is not a tenant name (a-z, 0-9, '-')")
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PublishedArtifact:
    uri: str
    files: dict[str, dict]  # relative path → {"sha256": ..., "bytes": ...}

    @property
    def total_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.files.values())


def _filesystem(protocol: str):
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError:
        if protocol not in ("s3", "gs", "gcs"):
            raise
    # No s3fs/gcsfs installed: pyarrow ships both filesystems; fsspec wraps them.
    from fsspec.implementations.arrow import ArrowFSWrapper
    from pyarrow import fs as pafs

    return ArrowFSWrapper(pafs.S3FileSystem() if protocol == "s3" else pafs.GcsFileSystem())


class ArtifactStore:
    def __init__(self, root_uri: str):
        self.root_uri = root_uri.rstrip("/")
        if "://" in root_uri and not root_uri.startswith("file://"):
            self.protocol, rest = root_uri.split("://", 1)
            self.fs = _filesystem(self.protocol)
            self.root = rest.rstrip("/")
            self.local_root: Path | None = None
        else:
            self.protocol = "file"
            self.fs = None
            self.local_root = Path(root_uri.removeprefix("file://")).expanduser().resolve()
            self.root = str(self.local_root)

    @property
    def is_local(self) -> bool:
        return self.local_root is not None

    def _relative(self, tenant: str, parts: tuple[str, ...]) -> str:
        checked = [safe_tenant(tenant)] + [safe_part(p, "name") for p in parts]
        return "/".join(["tenants", *checked])

    def path(self, tenant: str, *parts: str) -> str:
        """The filesystem path (local) or bucket key (remote) of a tenant-scoped artifact."""
        return f"{self.root}/{self._relative(tenant, parts)}"

    def uri(self, tenant: str, *parts: str) -> str:
        rel = self._relative(tenant, parts)
        return f"{self.local_root}/{rel}" if self.is_local else f"{self.protocol}://{self.root}/{rel}"

    def parse_uri(self, uri: str, tenant: str) -> tuple[str, ...]:
        """Turn a stored artifact URI back into its parts, refusing one outside `tenant`'s prefix."""
        prefix = self.uri(tenant) + "/"
        if not uri.startswith(prefix):
            raise StorePathError("uri", "not inside the tenant's prefix")
        parts = tuple(uri[len(prefix):].split("/"))
        for part in parts:
            safe_part(part, "uri")
        return parts

    # -- writing -------------------------------------------------------------------------------------

    def publish_files(self, tenant: str, parts: tuple[str, ...], files: dict[str, bytes | Path]) -> PublishedArtifact:
        """Publish a folder atomically. `files` maps a relative path (checked part by part) to bytes or a local file."""
        if not files:
            raise ValueError("an artifact needs at least one file")
        for rel in files:
            for piece in rel.split("/"):
                safe_part(piece, "file name")
            if rel == MANIFEST:
                raise StorePathError("file name", f"{MANIFEST} is reserved")
        target = self.path(tenant, *parts)
        manifest: dict[str, dict] = {}
        if self.is_local:
            final = Path(target)
            if final.exists():
                raise FileExistsError(f"artifact {self.uri(tenant, *parts)} exists; artifacts are immutable")
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.parent / f".{final.name}{TMP_MARKER}{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                for rel, source in sorted(files.items()):
                    manifest[rel] = self._write_local(staging / rel, source)
                atomic_write_bytes(staging / MANIFEST, self._manifest_bytes(manifest))
                fsync_dir(staging)
                os.rename(staging, final)
                fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        else:
            if self.fs.exists(f"{target}/{MANIFEST}"):
                raise FileExistsError(f"artifact {self.uri(tenant, *parts)} exists; artifacts are immutable")
            for rel, source in sorted(files.items()):
                data = source.read_bytes() if isinstance(source, Path) else source
                self.fs.pipe_file(f"{target}/{rel}", data)
                manifest[rel] = {"sha256": _sha256(data), "bytes": len(data)}
            self.fs.pipe_file(f"{target}/{MANIFEST}", self._manifest_bytes(manifest))
        return PublishedArtifact(uri=self.uri(tenant, *parts), files=manifest)

    def publish_dir(self, tenant: str, parts: tuple[str, ...], local_dir: Path) -> PublishedArtifact:
        local_dir = Path(local_dir)
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        return self.publish_files(tenant, parts, files)

    @staticmethod
    def _write_local(path: Path, source: bytes | Path) -> dict:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with open(path, "wb") as out:
            if isinstance(source, Path):
                with open(source, "rb") as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            else:
                digest.update(source)
                size = len(source)
                out.write(source)
            out.flush()
            os.fsync(out.fileno())
        return {"sha256": digest.hexdigest(), "bytes": size}

    @staticmethod
    def _manifest_bytes(files: dict[str, dict]) -> bytes:
        return json.dumps({"files": files, "published_at": time.time()}, indent=1, sort_keys=True).encode()

    # -- reading -------------------------------------------------------------------------------------

    def _read_raw(self, path: str) -> bytes:
        try:
            if self.is_local:
                return Path(path).read_bytes()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactNotFound(path) from None

    def manifest(self, tenant: str, *parts: str) -> dict[str, dict]:
        raw = self._read_raw(f"{self.path(tenant, *parts)}/{MANIFEST}")
        try:
            return json.loads(raw)["files"]
        except (ValueError, KeyError):
            raise ArtifactCorrupt(f"{self.uri(tenant, *parts)}: unreadable manifest") from None

    def exists(self, tenant: str, *parts: str) -> bool:
        try:
            self.manifest(tenant, *parts)
            return True
        except (ArtifactNotFound, ArtifactCorrupt):
            return False

    def read_file(self, tenant: str, parts: tuple[str, ...], rel: str) -> bytes:
        """One file of a published artifact, verified against the manifest."""
        entry = self.manifest(tenant, *parts).get(rel)
        if entry is None:
            raise ArtifactNotFound(f"{self.uri(tenant, *parts)}/{rel}")
        data = self._read_raw(f"{self.path(tenant, *parts)}/{rel}")
        if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
            raise ArtifactCorrupt(f"{self.uri(tenant, *parts)}/{rel}: sha256 mismatch; refusing to read it")
        return data

    def fetch_dir(self, tenant: str, parts: tuple[str, ...], dest: Path) -> dict[str, dict]:
        """Copy a published artifact into `dest`, verifying every file; for a local store, in place is fine too."""
        manifest = self.manifest(tenant, *parts)
        dest = Path(dest)
        for rel in manifest:
            data = self.read_file(tenant, parts, rel)
            atomic_write_bytes(dest / rel, data)
        return manifest

    def verify(self, tenant: str, *parts: str) -> dict[str, dict]:
        manifest = self.manifest(tenant, *parts)
        for rel in manifest:
            self.read_file(tenant, parts, rel)
        return manifest

    def list(self, tenant: str, *parts: str) -> list[str]:
        """Published artifacts directly under a prefix (half-published ones are invisible)."""
        base = self.path(tenant, *parts)
        try:
            names = [Path(p).name for p in (os.listdir(base) if self.is_local else self.fs.ls(base, detail=False))]
        except FileNotFoundError:
            return []
        visible = [n for n in names if not n.startswith(".") and _SAFE_PART.fullmatch(n)]
        return sorted(n for n in visible if self.exists(tenant, *parts, n))

    def delete(self, tenant: str, *parts: str) -> None:
        """Remove an artifact: the manifest first, so a half-deleted folder is already invisible."""
        target = self.path(tenant, *parts)
        if self.is_local:
            path = Path(target)
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
        else:
            if self.fs.exists(f"{target}/{MANIFEST}"):
                self.fs.rm_file(f"{target}/{MANIFEST}")
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
