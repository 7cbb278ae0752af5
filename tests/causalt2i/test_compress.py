"""Compression of a full tune into LoRA: fidelity rises with rank and is bitwise at full rank, the energy
target holds per tensor, the recorded fidelity is what a recomputation gives, and bad inputs are refused."""

from __future__ import annotations

import pytest
import torch

from causalt2i.adapter import load_adapter
from causalt2i.compress import CompressionError, FidelityConfig, attn2_deltas, compress_adapter, factorize, image_fidelity, retained_energy
from causalt2i.generation import Generator
from causalt2i.models import attn2_state, load_sdxl

FIDELITY = FidelityConfig(steps=4)


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(load_sdxl("tiny"))


@pytest.fixture(scope="module")
def full(full_tune_500):
    return load_adapter(full_tune_500.adapter_dir)


def test_a_rank_is_chosen_per_tensor_by_energy_and_full_rank_is_exact():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 6, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(8, 6, generator=generator))
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
    delta = (u * sigma) @ v.T  # energies 16, 4, 1, 0.25, ...: 16/21.33 = 0.75, 20/21.33 = 0.94, 21/21.33 = 0.98
    for energy, rank in ((0.7, 1), (0.9, 2), (0.97, 3), (0.99, 4)):
        factors, kept = factorize(delta, energy=energy)
        assert factors.rank == rank and kept >= energy and kept == pytest.approx(retained_energy(delta, factors))
    exact, kept = factorize(delta, rank=64)
    assert exact.rank == 8 and kept == 1.0 and torch.equal(exact.delta_weight(), delta)


def test_psnr_rises_with_rank_and_full_rank_is_bitwise_the_full_adapter(full, generator, tmp_path):
    psnr = []
    for rank in (1, 2, 4):
        manifest = compress_adapter(full, tmp_path / f"rank-{rank}", rank=rank, generator=generator, fidelity=FIDELITY)
        assert set(manifest.compressed_from.ranks.values()) == {rank}
        psnr.append(manifest.compressed_from.fidelity.psnr_db)
    assert psnr == sorted(psnr) and len(set(psnr)) == len(psnr), f"PSNR does not rise with rank: {psnr}"
    full_rank = max(min(t.shape) for k, t in full.tensors.items() if k.endswith(".weight"))  # every tensor's own full rank or more
    manifest = compress_adapter(full, tmp_path / "full-rank", rank=full_rank, generator=generator, fidelity=FIDELITY)
    fidelity = manifest.compressed_from.fidelity
    assert fidelity.psnr_db is None and fidelity.max_abs_diff == 0 and fidelity.mse == 0.0
    # Bitwise in the U-Net too, not only in the images.
    host = generator.host
    host.apply(full)
    applied_full = {k: v.clone() for k, v in attn2_state(generator.parts.unet).items()}
    host.apply(load_adapter(tmp_path / "full-rank"))
    for name, tensor in attn2_state(generator.parts.unet).items():
        assert torch.equal(tensor, applied_full[name]), name
    host.remove()


def test_energy_target_keeps_each_delta_and_the_record_matches_a_recomputation(full, compressed_dir, generator):
    compressed = load_adapter(compressed_dir)
    record = compressed.manifest.compressed_from
    assert record.energy == 0.99 and record.source_sha256 == full.manifest.tensors_sha256
    deltas = attn2_deltas(full, attn2_state(generator.parts.unet))
    factors = compressed.lora_factors()
    assert {f"{m}.weight" for m in factors} == {k for k in deltas if k.endswith(".weight")}
    for module, f in factors.items():
        kept = retained_energy(deltas[f"{module}.weight"], f)
        assert kept >= 0.99, f"{module} keeps {kept:.4f} of its energy"
        assert kept == pytest.approx(record.retained_energy[f"{module}.weight"], abs=1e-12)
        assert f.rank == record.ranks[f"{module}.weight"] < min(f.up.shape[0], f.down.shape[1])
        assert torch.equal(f.bias, deltas[f"{module}.bias"]) if f.bias is not None else f"{module}.bias" not in deltas
    assert compressed.manifest.tensors_bytes < record.full_bytes
    fidelity = record.fidelity
    again = image_fidelity(generator, full, compressed, FidelityConfig(prompts=tuple(fidelity.prompts), seeds=tuple(fidelity.seeds), steps=fidelity.steps, guidance=fidelity.guidance))
    assert again == fidelity
    assert fidelity.psnr_db is not None and fidelity.max_abs_diff > 0, "energy 0.99 should not be lossless on this tune"


def test_refusals_name_the_field_and_write_nothing(full_tune_500, lora_adapter_dir, generator, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CompressionError, match="already a LoRA adapter") as err:
        compress_adapter(lora_adapter_dir, out, energy=0.99, generator=generator)
    assert err.value.field == "adapter"
    other_base = Generator(load_sdxl("tiny", seed=1))
    with pytest.raises(CompressionError, match="not the base") as err:
        compress_adapter(full_tune_500.adapter_dir, out, energy=0.99, generator=other_base)
    assert err.value.field == "base_model"
    for options, field in ((dict(), "rank"), (dict(rank=2, energy=0.9), "rank"), (dict(rank=0), "rank"), (dict(energy=1.5), "energy"), (dict(energy=0.0), "energy")):
        with pytest.raises(CompressionError) as err:
            compress_adapter(full_tune_500.adapter_dir, out, generator=generator, **options)
        assert err.value.field == field, options
    assert not out.exists()


def test_the_base_is_left_bare(full, generator, tmp_path):
    base = {k: v.clone() for k, v in attn2_state(generator.parts.unet).items()}
    compress_adapter(full, tmp_path / "c", rank=1, generator=generator, fidelity=FidelityConfig(steps=1, seeds=(0,)))
    assert generator.active is None
    for name, tensor in attn2_state(generator.parts.unet).items():
        assert torch.equal(tensor, base[name]), name
