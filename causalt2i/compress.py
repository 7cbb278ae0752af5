"""Compression of a `full`-mode adapter into a LoRA adapter: a truncated SVD of each ΔW = W_tuned − W_base.

ΔW = U Σ Vᵀ; keeping the r largest singular values gives the best rank-r approximation in the Frobenius
norm (Eckart–Young), stored as LoRA factors B = U_r Σ_r (`lora_B`, [out, r]) and A = V_rᵀ (`lora_A`,
[r, in]) with alpha = r, i.e. scale 1, the split kohya's LoRA extraction uses. The rank is chosen per
tensor: fixed (`rank`, capped at the tensor's full rank) or the smallest r whose retained energy
1 − ‖ΔW − BA‖²_F / ‖ΔW‖²_F reaches `energy` (measured on the stored fp32 factors).

At full rank nothing is truncated, and the factors are the exact pair (ΔW, I) instead of the SVD's, which
reconstructs ΔW only up to rounding: full-rank compression is then bitwise the full adapter, the end point
against which the lower ranks are judged. The bias changes of `to_out.0` (which no rank-r product can
express) travel exactly, as peft's `lora_B.bias`.

The base is needed (to measure fidelity, and to form ΔW from a version-1 adapter that stored W_tuned) and
must be the one the adapter was tuned on: its attn2 fingerprint is checked. The result is a new adapter
(same tenant and name, so a registry files it as a new version) whose manifest records the ranks, the
retained energy per tensor, and the measured fidelity: PSNR and max |Δ| of images generated from the same
prompts and seeds with the full adapter and with the compressed one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, Adapter, AdapterManifest, load_adapter, save_adapter
from causalt2i.adapter_format import CompressionRecord, ImageFidelity
from causalt2i.generation import DEFAULT_GUIDANCE, DEFAULT_STEPS, Generator
from causalt2i.lora import LoRAFactors, factors_to_tensors
from causalt2i.models import attn2_state, load_sdxl
from causalt2i.spec import join_subject_phrases

Progress = Callable[[int, int], None]
"""Called after each tensor with (tensors done, total)."""


class CompressionError(ValueError):
    """A compression that must not run. `field` names the input at fault (`adapter`, `base_model`, `rank`, ...)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class FidelityConfig:
    """The generations compared: `prompts` (default: each subject's prompt and the joint one) × `seeds`."""

    prompts: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1)
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    width: int | None = None
    height: int | None = None


@dataclass
class CompressedTensors:
    factors: dict[str, LoRAFactors]  # by module name (`...attn2.to_q`)
    retained_energy: dict[str, float] = field(default_factory=dict)  # by weight name (`...attn2.to_q.weight`)

    @property
    def ranks(self) -> dict[str, int]:
        return {f"{module}.weight": f.rank for module, f in self.factors.items()}


def check_options(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise CompressionError("rank", "give exactly one of a fixed rank (--rank R) or a retained-energy target (--energy E)")
    if rank is not None and rank < 1:
        raise CompressionError("rank", f"must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise CompressionError("energy", f"must be in (0, 1], the fraction of each ΔW's Frobenius energy to keep; got {energy}")


def retained_energy(delta: torch.Tensor, factors: LoRAFactors) -> float:
    """1 − ‖ΔW − scale·BA‖²_F / ‖ΔW‖²_F in float64 (1.0 for a zero ΔW)."""
    total = float(delta.double().pow(2).sum())
    if total == 0.0:
        return 1.0
    residual = delta.double() - factors.delta_weight().double()
    return 1.0 - float(residual.pow(2).sum()) / total


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> LoRAFactors:
    return LoRAFactors(down=vh[:rank].float().contiguous(), up=(u[:, :rank] * s[:rank]).float().contiguous(), alpha=float(rank))


def _exact(delta: torch.Tensor) -> LoRAFactors:
    out_features, in_features = delta.shape
    if in_features <= out_features:
        return LoRAFactors(down=torch.eye(in_features), up=delta.float().clone(), alpha=float(in_features))
    return LoRAFactors(down=delta.float().clone(), up=torch.eye(out_features), alpha=float(out_features))


def factorize(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> tuple[LoRAFactors, float]:
    """LoRA factors of one ΔW [out, in] and the energy they retain (see the module docstring)."""
    check_options(rank, energy)
    full = min(delta.shape)
    if rank is not None and rank >= full:
        return _exact(delta), 1.0
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        energies = s.pow(2)
        total = float(energies.sum())
        if total == 0.0:
            return _truncated(u, s, vh, 1), 1.0
        cumulative = torch.cumsum(energies, 0) / total
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype))) + 1
    while True:
        if rank >= full:
            return _exact(delta), 1.0
        factors = _truncated(u, s, vh, rank)
        kept = retained_energy(delta, factors)
        # The fp32 factors can fall a hair short of the float64 cut; one more singular value settles it.
        if energy is None or kept >= energy:
            return factors, kept
        rank += 1


def attn2_deltas(adapter: Adapter, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW in fp32 for every attn2 tensor the full adapter changes (weights and biases)."""
    deltas = {}
    for name, value in adapter.tensors.items():
        if name in (TE1_ROWS, TE2_ROWS):
            continue
        if name not in base:
            raise CompressionError("adapter", f"has {name}, which the base lacks")
        if adapter.manifest.attn2_storage == "delta":
            deltas[name] = value.float()
        else:
            deltas[name] = value.float() - base[name].detach().to("cpu").float()
    return deltas


def compress_tensors(deltas: dict[str, torch.Tensor], *, rank: int | None = None, energy: float | None = None, progress: Progress | None = None) -> CompressedTensors:
    check_options(rank, energy)
    weights = sorted(name for name in deltas if name.endswith(".weight"))
    result = CompressedTensors(factors={})
    for index, name in enumerate(weights):
        module = name[: -len(".weight")]
        factors, kept = factorize(deltas[name], rank=rank, energy=energy)
        bias = deltas.get(f"{module}.bias")
        if bias is not None:
            # peft scales lora_B.bias like the product; the scale is 1 here, so Δb is stored as it is.
            factors = LoRAFactors(down=factors.down, up=factors.up, alpha=factors.alpha, bias=bias.float().clone())
        result.factors[module] = factors
        result.retained_energy[name] = kept
        if progress is not None:
            progress(index + 1, len(weights))
    stray = sorted(set(deltas) - set(weights) - {f"{m}.bias" for m in result.factors})
    if stray:
        raise CompressionError("adapter", f"has a bias without its weight ({stray[0]}); it cannot be compressed")
    return result


def default_prompts(manifest: AdapterManifest) -> tuple[str, ...]:
    phrases = [f"a {s.token} {s.class_word}" for s in manifest.subjects]
    return tuple(phrases + ([join_subject_phrases(phrases)] if len(phrases) > 1 else []))


@torch.no_grad()
def image_fidelity(generator: Generator, reference: Adapter, candidate: Adapter, config: FidelityConfig = FidelityConfig()) -> ImageFidelity:
    """PSNR and max |Δ| (uint8) of `candidate`'s images against `reference`'s: same prompts, seeds and settings."""
    prompts = list(config.prompts or default_prompts(reference.manifest))
    request = {"steps": config.steps, "guidance": config.guidance, "width": config.width, "height": config.height, "n": len(config.seeds), "seeds": list(config.seeds)}
    images = []
    for adapter in (reference, candidate):
        generator.use(adapter)
        images.append(torch.cat([generator({**request, "prompt": prompt}).pixels for prompt in prompts]))
    generator.use(None)
    diff = images[0].int() - images[1].int()
    mse = float(diff.double().pow(2).mean())
    width, height = images[0].shape[-1], images[0].shape[-2]
    return ImageFidelity(
        psnr_db=None if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse),
        max_abs_diff=int(diff.abs().max()),
        mse=mse,
        prompts=prompts,
        seeds=list(config.seeds),
        steps=config.steps,
        guidance=config.guidance,
        width=int(width),
        height=int(height),
    )


def compressed_manifest_fields(source: AdapterManifest, compressed: CompressedTensors) -> dict:
    return {
        "base_model": source.base_model,
        "base_fingerprint": source.base_fingerprint,
        "subjects": [s.model_dump() for s in source.subjects],
        "param_mode": "lora",
        "lora_rank": max(f.rank for f in compressed.factors.values()),
        "lora_alpha": None,  # each module's alpha is its rank: scale 1
        "lora_scale": 1.0,
        "dtype": "float32",
        "training": source.training,
        "metrics": source.metrics,
        "tenant": source.tenant,
        "name": source.name,
        "step": source.step,
    }


def compress_adapter(
    adapter: Adapter | str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    generator: Generator | None = None,
    base_model: str | None = None,
    fidelity: FidelityConfig = FidelityConfig(),
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> AdapterManifest:
    """Compress a full adapter into a LoRA adapter written to `out_dir` (new or empty); returns its manifest.

    `generator` holds a loaded base to reuse (its active adapter is removed first); otherwise `base_model`
    (default: the manifest's) is loaded in fp32, so ΔW and the fidelity images are fp32. Refusals (`CompressionError`)
    happen before anything is written: a LoRA adapter (`adapter`), a base whose fingerprint differs
    (`base_model`), bad options (`rank` / `energy`), an occupied `out` folder.
    """
    check_options(rank, energy)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CompressionError("out", f"{out_dir} exists and is not an empty folder; nothing was written")
    source = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    manifest = source.manifest
    if manifest.param_mode != "full":
        raise CompressionError("adapter", f"{manifest.tenant}/{manifest.name} is already a LoRA adapter; only full-mode adapters are compressed")
    if generator is None:
        generator = Generator(load_sdxl(base_model or manifest.base_model, device=device))
    generator.use(None)
    parts = generator.parts
    fingerprint = parts.base_fingerprint()
    if fingerprint != manifest.base_fingerprint:
        raise CompressionError(
            "base_model",
            f"{parts.base_model!r} is not the base this adapter was tuned on (its attn2 fingerprint is {fingerprint[:12]}…, the adapter's {manifest.base_fingerprint[:12]}…)",
        )
    started = time.perf_counter()
    base = attn2_state(parts.unet)
    compressed = compress_tensors(attn2_deltas(source, base), rank=rank, energy=energy, progress=progress)
    seconds = time.perf_counter() - started
    tensors = {**factors_to_tensors(compressed.factors), TE1_ROWS: source.tensors[TE1_ROWS].float(), TE2_ROWS: source.tensors[TE2_ROWS].float()}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fields = compressed_manifest_fields(manifest, compressed)
    # Fidelity is measured on exactly the tensors that are then written (a safetensors round trip is bitwise).
    draft = AdapterManifest(**fields, tensors_sha256="", tensors_bytes=0, created_at=time.time())
    measured = image_fidelity(generator, source, Adapter(manifest=draft, tensors=tensors), fidelity)
    record = CompressionRecord(
        source_tenant=manifest.tenant,
        source_name=manifest.name,
        source_step=manifest.step,
        source_sha256=manifest.tensors_sha256,
        rank=rank,
        energy=energy,
        ranks=compressed.ranks,
        retained_energy=compressed.retained_energy,
        full_bytes=manifest.tensors_bytes,
        seconds=round(seconds, 4),
        fidelity=measured,
    )
    return save_adapter(out_dir, tensors, {**fields, "compressed_from": record.model_dump()})
