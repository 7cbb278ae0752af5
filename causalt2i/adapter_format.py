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

# 2: full-mode adapters store ΔW (`attn2_storage: delta`); LoRA adapters record alpha; compressed adapters
# record where they came from. Version 1 folders (tuned W in bf16) are still read.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
# How a full tune's ΔW is stored: measured against bf16 W, bf16 ΔW and fp32 W in BENCHMARKS.md ("Adapter
# precision"); fp16 ΔW keeps all but ~0.03% of the tune's effect at the bytes of a bf16 W.
FULL_DELTA_DTYPE = "float16"
TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
TE1_ROWS = "text_encoder.token_embeddings"
TE2_ROWS = "text_encoder_2.token_embeddings"


class AdapterError(ValueError):
    """An adapter that must not be loaded or applied; the message says why."""


def tensor_group(name: str) -> str:
    """The group a tensor's dtype is recorded under: the token rows by name, else `lora` or `attn2`."""
    if name in (TE1_ROWS, TE2_ROWS):
        return name
    return "lora" if ".lora_" in name else "attn2"


def tensor_dtypes(tensors) -> dict[str, str]:
    """{group: dtype name} of a tensor mapping (anything with a `.dtype` such as `torch.float32`)."""
    groups: dict[str, str] = {}
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        group = tensor_group(name)
        if groups.setdefault(group, dtype) != dtype:
            raise AdapterError(f"{name}: dtype {dtype}, but other {group} tensors are {groups[group]}")
    return groups


class AdapterSubject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    class_word: str


class ImageFidelity(BaseModel):
    """Images of one adapter against another's, same prompts and seeds: how far apart they are (uint8 pixels)."""

    model_config = ConfigDict(extra="forbid")
    psnr_db: float | None  # null when every image is identical (infinite PSNR)
    max_abs_diff: int  # the largest |Δ| of any pixel channel, 0..255
    mse: float
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    width: int
    height: int


class CompressionRecord(BaseModel):
    """How a LoRA adapter was made from a full one (`causalt2i.compress`)."""

    model_config = ConfigDict(extra="forbid")
    source_tenant: str
    source_name: str
    source_step: int
    source_sha256: str  # the full adapter's tensor file
    method: Literal["svd"] = "svd"
    rank: int | None  # the fixed rank asked for, or null
    energy: float | None  # the retained-energy target asked for, or null
    ranks: dict[str, int]  # the rank each attn2 weight got
    retained_energy: dict[str, float]  # 1 − ‖ΔW − BA‖²/‖ΔW‖² per weight
    full_bytes: int
    seconds: float
    fidelity: ImageFidelity


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    base_model: str
    base_fingerprint: str
    subjects: list[AdapterSubject]
    param_mode: Literal["full", "lora"]
    lora_rank: int | None = None  # the rank (the largest one when ranks differ per module)
    lora_alpha: float | None = None  # null: each module's alpha is lora_scale × its rank
    lora_scale: float | None = None
    # full mode: the attn2 tensors are the tuned values (`weight`, version 1) or W_tuned − W_base (`delta`).
    attn2_storage: Literal["weight", "delta"] = "weight"
    compressed_from: CompressionRecord | None = None
    dtype: str  # of the attention tensors (attn2 or LoRA factors)
    tensor_dtypes: dict[str, str] = {}  # every tensor group's dtype (`tensor_group`), e.g. token rows in float32
    alpha: float | None = None  # the L_cst weight the run used (calibrated under `alpha: auto`)
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

    def module_alpha(self, rank: int) -> float:
        """A LoRA module's alpha (its update is scaled by alpha / rank, as in peft)."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        return (1.0 if self.lora_scale is None else self.lora_scale) * rank


def read_manifest(path: str | Path) -> AdapterManifest:
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AdapterError(f"{path}: no {MANIFEST_FILE}; the adapter is incomplete or not an adapter, and is not loaded")
    try:
        manifest = AdapterManifest.model_validate(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
        raise AdapterError(f"{manifest_path}: not a valid adapter manifest: {err}") from None
    if manifest.format_version not in READABLE_FORMAT_VERSIONS:
        raise AdapterError(f"{manifest_path}: format version {manifest.format_version}, this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
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
