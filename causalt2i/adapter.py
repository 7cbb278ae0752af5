"""The tenant adapter artifact and its in-place application to a resident base (METHOD.md, "The tenant artifact").

On disk: `adapter.safetensors` (the tuned attn2 tensors in diffusers names, or LoRA factors, plus
`text_encoder.token_embeddings` [n, d1] and `text_encoder_2.token_embeddings` [n, d2]) and
`manifest.json`, written last. Both writes are atomic. A folder without a manifest is never loaded, and
the tensor file must match the manifest's sha256.

`AdapterHost` keeps one base resident and swaps adapters into it in place: apply changes only the attn2
tensors and the reserved identifier-token rows; remove copies the saved base values back, bit for bit.
An applied value is computed in fp32 from the saved base and cast once to the live dtype: W + ΔW for a
full adapter that stores ΔW (`attn2_storage: delta`), W + (α/r)·B·A for LoRA (the same sum peft's merge
computes, so a fused diffusers pipeline holds the same bits), or the stored W of a version-1 full adapter.

Full-mode precision (issue 14): the artifact stores ΔW = W_tuned − W_base in fp16, and the served weight
is rounded once. A base served in a 16-bit dtype has already lost the low bits of W_base; adding ΔW to it
and casting rounds twice (1.09% of the tune's effect lost in fp16 on the tiny 500-step tune, against a
0.78% floor that is the rounding of W_tuned itself). When the parts were cast with `keep_attn2_residual`
(`load_sdxl(dtype=...)` does), the host adds ΔW to hi + lo, the live 16-bit base plus the residual the
cast rounded away, which is the fp32 base to within 2⁻²⁰ of its largest entry (2⁻¹⁵ in bf16), and casts that sum once (0.78%). The
residual costs one more 16-bit copy of attn2 (1.09 GB at SDXL size in fp16) on the backup device, so a
swap stays a device-side computation. LoRA values keep the live base (peft's merged bits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from causalt2i.adapter_format import (  # noqa: F401  (re-exported: the format is part of this module's API)
    FORMAT_VERSION,
    MANIFEST_FILE,
    TE1_ROWS,
    TE2_ROWS,
    TENSORS_FILE,
    AdapterError,
    AdapterManifest,
    AdapterSubject,
    read_manifest,
    verify_adapter,
)
from causalt2i.atomic import atomic_write_bytes, atomic_write_text, sha256_file
from causalt2i.lora import LoRAFactors, factors_from_tensors
from causalt2i.models import SDXLParts, attn2_state
from causalt2i.spec import MAX_SUBJECTS


@dataclass
class Adapter:
    manifest: AdapterManifest
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def lora_factors(self) -> dict[str, LoRAFactors]:
        """The attn2 update of a LoRA adapter, one `LoRAFactors` per adapted projection (by module name)."""
        if self.manifest.param_mode != "lora":
            raise AdapterError(f"adapter {self.manifest.tenant}/{self.manifest.name} is a full-mode adapter and has no LoRA form; compress it first (ct2i compress)")
        return factors_from_tensors({k: v for k, v in self.tensors.items() if k not in (TE1_ROWS, TE2_ROWS)}, self.manifest.module_alpha)

    def pin_memory(self) -> "Adapter":
        """Page-lock the tensors (CUDA only) so host→device copies are fast and asynchronous."""
        if torch.cuda.is_available():
            self.tensors = {k: v.pin_memory() for k, v in self.tensors.items()}
        return self


def save_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], manifest_fields: dict) -> AdapterManifest:
    """Write the tensors, then the manifest (carrying their sha256) last; both atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(out_dir / TENSORS_FILE, save_safetensors(contiguous))
    fields = {"created_at": time.time(), **manifest_fields}
    manifest = AdapterManifest(
        **fields,
        tensors_sha256=sha256_file(out_dir / TENSORS_FILE),
        tensors_bytes=(out_dir / TENSORS_FILE).stat().st_size,
    )
    atomic_write_text(out_dir / MANIFEST_FILE, manifest.model_dump_json(indent=2))
    return manifest


def load_adapter(path: str | Path) -> Adapter:
    manifest = verify_adapter(path)
    tensors = load_file(str(Path(path) / TENSORS_FILE))
    for key in (TE1_ROWS, TE2_ROWS):
        if key not in tensors or tensors[key].shape[0] != len(manifest.subjects):
            raise AdapterError(f"{path}: {key} is missing or does not have one row per subject")
    adapter = Adapter(manifest=manifest, tensors=tensors, path=Path(path))
    if manifest.param_mode == "lora":
        try:
            adapter.lora_factors()
        except ValueError as err:
            raise AdapterError(f"{path}: {err}") from None
    return adapter


class AdapterHost:
    """One resident base into which adapters are applied and removed in place.

    On creation it grows both embedding tables by `MAX_SUBJECTS` reserved rows (identifier slots) and keeps
    a copy of the base attn2 tensors (on `backup_device`, the model's device by default, so a switch is a
    device-to-device copy). An adapter's tokens are mapped to slots; `token_ids` is what prompt encoding uses.
    """

    def __init__(self, parts: SDXLParts, *, backup_device: torch.device | str | None = None):
        self.parts = parts
        self.fingerprint = parts.base_fingerprint()
        self._live = attn2_state(parts.unet)
        device = backup_device or parts.device
        self._backup = {k: v.detach().to(device, copy=True) for k, v in self._live.items()}
        residual = parts.attn2_residual
        self._residual = {k: residual[k].to(device) for k in self._live} if residual is not None else None
        self._tables = []
        for encoder in (parts.text_encoder, parts.text_encoder_2):
            vocab = encoder.get_input_embeddings().weight.shape[0]
            encoder.resize_token_embeddings(vocab + MAX_SUBJECTS, mean_resizing=False)
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[vocab:] = 0
            self._tables.append((table, vocab))
        self._slot_backup = [table[start:].detach().clone() for table, start in self._tables]
        self.active: Adapter | None = None
        self.token_ids: dict[str, int] = {}

    def check(self, adapter: Adapter) -> None:
        manifest = adapter.manifest
        if manifest.base_fingerprint != self.fingerprint:
            raise AdapterError(f"adapter {manifest.tenant}/{manifest.name} was tuned on a different base (fingerprint {manifest.base_fingerprint[:12]}…, this base {self.fingerprint[:12]}…)")
        if len(manifest.subjects) > MAX_SUBJECTS:
            raise AdapterError(f"adapter has {len(manifest.subjects)} subjects; at most {MAX_SUBJECTS} are supported")

    @torch.no_grad()
    def apply(self, adapter: Adapter) -> None:
        """Swap `adapter` in (replacing any active one). Only attn2 tensors and slot rows change."""
        self.check(adapter)
        tensors = adapter.tensors
        updates = self._updates(adapter)
        # Every live tensor is written exactly once: the adapter's value, or the base's where it has none.
        for name, live in self._live.items():
            live.copy_(self._adapted_value(adapter, name, updates), non_blocking=True)
        for (table, start), saved in zip(self._tables, self._slot_backup):
            table[start:] = saved
        n = len(adapter.manifest.subjects)
        for (table, start), key in zip(self._tables, (TE1_ROWS, TE2_ROWS)):
            table[start : start + n] = tensors[key].to(table.device, table.dtype)
        self.active = adapter
        self.token_ids = {token: self._tables[0][1] + i for i, token in enumerate(adapter.manifest.tokens)}

    def _updates(self, adapter: Adapter) -> dict[str, LoRAFactors] | dict[str, torch.Tensor]:
        """The adapter's attn2 entries by live tensor name (full) or by module name (LoRA); unknown names refused."""
        if adapter.manifest.param_mode == "full":
            updates = {k: v for k, v in adapter.tensors.items() if k not in (TE1_ROWS, TE2_ROWS)}
            unknown = [k for k in updates if k not in self._live]
        else:
            updates = adapter.lora_factors()
            unknown = [k for k in updates if f"{k}.weight" not in self._live]
        if unknown:
            raise AdapterError(f"adapter has tensors this base lacks, e.g. {unknown[0]}")
        return updates

    def _adapted_value(self, adapter: Adapter, name: str, updates) -> torch.Tensor:
        live = self._live[name]
        base = self._backup[name]
        if adapter.manifest.param_mode == "full":
            value = updates.get(name)
            if value is None:
                return base
            if adapter.manifest.attn2_storage == "weight":
                return value.to(live.device, live.dtype, non_blocking=True)
            fp32_base = base.float() if self._residual is None else base.float() + self._residual[name].float()
            return (fp32_base + value.to(base.device).float()).to(live.dtype)
        module, _, kind = name.rpartition(".")
        factors = updates.get(module)
        delta = None if factors is None else (factors.delta_weight if kind == "weight" else factors.delta_bias)(base.device)
        if delta is None:
            return base
        return (base.float() + delta).to(live.dtype)

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the base exactly as it was before `apply`."""
        for name, live in self._live.items():
            live.copy_(self._backup[name].to(live.device, non_blocking=True))
        for (table, start), saved in zip(self._tables, self._slot_backup):
            table[start:] = saved
        self.active = None
        self.token_ids = {}
