"""The tenant adapter's on-disk format, without torch: file names, the manifest schema and its verification.

One source for the format, read by the trainer (which writes it), the control plane (which verifies and
registers it without importing torch) and serving (which loads it). `causalt2i.adapter` adds the tensors.

An adapter folder holds `adapter.safetensors` and `manifest.json`; the manifest is written last and
carries the tensor file's sha256, so a folder without a manifest, or whose tensors do not match it, is
never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from causalt2i.atomic import sha256_file

FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
TE1_ROWS = "text_encoder.token_embeddings"
TE2_ROWS = "text_encoder_2.token_embeddings"


class AdapterError(ValueError):
    """An adapter that must not be loaded or applied; the message says why."""


class AdapterSubject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    class_word: str


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    base_model: str
    base_fingerprint: str
    subjects: list[AdapterSubject]
    param_mode: Literal["full", "lora"]
    lora_rank: int | None = None
    lora_scale: float | None = None
    dtype: str
    training: dict
    metrics: dict = {}
    tensors_sha256: str
    tensors_bytes: int
    tenant: str
    name: str
    step: int
    created_at: float

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.subjects]


def read_manifest(path: str | Path) -> AdapterManifest:
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AdapterError(f"{path}: no {MANIFEST_FILE}; the adapter is incomplete or not an adapter, and is not loaded")
    try:
        manifest = AdapterManifest.model_validate(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
        raise AdapterError(f"{manifest_path}: not a valid adapter manifest: {err}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise AdapterError(f"{manifest_path}: format version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    return manifest


def verify_adapter(path: str | Path) -> AdapterManifest:
    """Check the manifest and that the tensor file's sha256 matches it; return the manifest."""
    manifest = read_manifest(path)
    tensor_path = Path(path) / TENSORS_FILE
    if not tensor_path.is_file():
        raise AdapterError(f"{path}: {TENSORS_FILE} is missing")
    digest = sha256_file(tensor_path)
    if digest != manifest.tensors_sha256:
        raise AdapterError(f"{tensor_path}: sha256 {digest[:12]}… does not match the manifest's {manifest.tensors_sha256[:12]}…; the file is corrupt and is refused")
    return manifest
