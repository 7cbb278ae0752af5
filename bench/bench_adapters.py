"""Adapter bytes per mode, full-mode precision per storage, export time, compression time and PSNR per rank.

    .venv/bin/python bench/bench_adapters.py [--steps 500] [--fidelity-steps 30] [--threads 1]

- Bytes: real files of tiny tunes (full, LoRA r=16 and r=64, full compressed at energy 0.99), and for
  SDXL the same layouts computed from the real U-Net's attn2 shapes, built on the meta device from its
  config (reference/sdxl-configs.md), 2 subjects.
- Precision: the median over attn2 tensors of ‖served − trained‖ / ‖trained − base‖ of a `--steps` full
  tune, for each way of storing it, served in fp32 (CPU, and 'tiny' anywhere) and in fp16 (the GPU
  deployment).
- Export time of each format: the tiny LoRA tune, and an SDXL-shaped LoRA r=16 (random factors).
- Compression of the tiny tune per rank and energy: time, bytes as a fraction of the full adapter, and
  the PSNR / max |Δ| of `--fidelity-steps` images against the full adapter; for SDXL, the SVD time per
  distinct attn2 shape, measured once each, times the number of tensors of that shape.

No assertions; record the figures in BENCHMARKS.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causalt2i.adapter import load_adapter  # noqa: E402
from causalt2i.adapter_format import TENSORS_FILE  # noqa: E402
from causalt2i.compress import FidelityConfig, compress_adapter, factorize  # noqa: E402
from causalt2i.data.synthetic import write_synthetic_spec  # noqa: E402
from causalt2i.export import FORMATS, export_files, write_export  # noqa: E402
from causalt2i.generation import Generator  # noqa: E402
from causalt2i.lora import LoRAFactors  # noqa: E402
from causalt2i.models import attn2_state, load_sdxl  # noqa: E402
from causalt2i.spec import load_spec  # noqa: E402
from causalt2i.trainer import Trainer, train  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, norm_num_groups=32,
)
SDXL_TOKEN_WIDTHS = (768, 1280)
SUBJECTS = 2


def sdxl_attn2_shapes() -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return {name: tuple(t.shape) for name, t in attn2_state(unet).items()}


def spec_path(root: Path, name: str, steps: int, **train_fields) -> Path:
    path = write_synthetic_spec(root / name, name=name, steps=steps, n_subjects=SUBJECTS, images_per_subject=2, size=64)
    data = yaml.safe_load(path.read_text())
    data["train"].update(train_fields)
    path.write_text(yaml.safe_dump(data))
    return path


def tune_effect_lost(served: dict, trained: dict, base: dict) -> float:
    return statistics.median(float((served[k].float() - trained[k]).norm() / (trained[k] - base[k]).norm()) for k in trained)


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="steps of the tiny full tune")
    parser.add_argument("--fidelity-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-adapters-"))

    # --- the tiny tunes ---------------------------------------------------------------------------------
    started = time.perf_counter()
    trainer = Trainer(load_spec(spec_path(root, "full", args.steps)), root / "full-run")
    base = {k: v.detach().clone() for k, v in attn2_state(trainer.model.parts.unet).items()}
    for _ in range(trainer.total_steps):
        trainer.train_step()
    trained = {k: v.detach().clone() for k, v in attn2_state(trainer.model.parts.unet).items()}
    full_dir = trainer.export_adapter()
    print(f"tiny full tune: {args.steps} steps in {time.perf_counter() - started:.1f} s")
    lora_dirs = {r: train(load_spec(spec_path(root, f"lora{r}", 2, param_mode="lora", lora_rank=r, lr=1e-2)), root / f"lora{r}-run").adapter_dir for r in (16, 64)}
    full = load_adapter(full_dir)
    generator = Generator(load_sdxl("tiny"))
    fidelity = FidelityConfig(steps=args.fidelity_steps)

    # --- bytes --------------------------------------------------------------------------------------------
    shapes = sdxl_attn2_shapes()
    attn2_params = sum(torch.Size(s).numel() for s in shapes.values())
    rows_bytes = SUBJECTS * sum(SDXL_TOKEN_WIDTHS) * 4
    weights = {k: s for k, s in shapes.items() if k.endswith(".weight")}

    def sdxl_lora_bytes(rank: int) -> int:
        return sum((s[0] + s[1]) * rank * 4 for s in weights.values()) + rows_bytes

    energy_dir = root / "energy-0.99"
    started = time.perf_counter()
    energy = compress_adapter(full, energy_dir, energy=0.99, generator=generator, fidelity=fidelity)
    energy_seconds = time.perf_counter() - started
    full_bytes = (full_dir / TENSORS_FILE).stat().st_size
    fraction = energy.tensors_bytes / full_bytes
    print("\n### Adapter bytes (2 subjects)\n")
    print("| mode | tiny (file) | SDXL (from the meta-device shapes) |\n|---|---|---|")
    print(f"| full, ΔW fp16 (format 2) | {full_bytes:,} B | {mib(attn2_params * 2 + rows_bytes)} |")
    print(f"| full, W bf16 (format 1) | same bytes | {mib(attn2_params * 2 + rows_bytes)} |")
    for r, path in lora_dirs.items():
        print(f"| LoRA r={r}, fp32 factors | {(path / TENSORS_FILE).stat().st_size:,} B | {mib(sdxl_lora_bytes(r))} |")
    print(f"| full compressed at energy 0.99 (tiny tune's ranks {min(energy.compressed_from.ranks.values())}..{max(energy.compressed_from.ranks.values())}) "
          f"| {energy.tensors_bytes:,} B = {fraction:.1%} of full | {fraction:.1%} of full ≈ {mib(fraction * (attn2_params * 2 + rows_bytes))} (if SDXL's ΔW compress like the tiny tune's) |")
    print(f"\nSDXL attn2: {attn2_params / 1e6:.1f}M parameters in {len(weights)} weights")

    # --- precision ----------------------------------------------------------------------------------------
    print("\n### Full-mode precision: tune effect lost (median over tensors)\n")
    print("| storage | bytes/param | served fp32 | served fp16 |\n|---|---|---|---|")
    options = {
        "W bf16 (format 1)": (lambda k: trained[k].bfloat16(), False, 2),
        "W fp16": (lambda k: trained[k].half(), False, 2),
        "ΔW bf16": (lambda k: (trained[k] - base[k]).bfloat16(), True, 2),
        "ΔW fp16 (chosen)": (lambda k: (trained[k] - base[k]).half(), True, 2),
        "W fp32": (lambda k: trained[k].clone(), False, 4),
    }
    for label, (stored, is_delta, width) in options.items():
        cells = []
        for dtype in (torch.float32, torch.float16):
            served = {}
            for k in trained:
                value = stored(k).float()
                served[k] = ((base[k].to(dtype).float() + value) if is_delta else value).to(dtype)
            cells.append(f"{tune_effect_lost(served, trained, base):.3%}")
        print(f"| {label} | {width} | {cells[0]} | {cells[1]} |")
    floor = tune_effect_lost({k: v.half() for k, v in trained.items()}, trained, base)
    print(f"\nfp16 floor (the trained weights themselves in fp16): {floor:.3%}")
    generator.use(full)
    host_served = {k: v.detach().clone() for k, v in attn2_state(generator.parts.unet).items()}
    generator.use(None)
    print(f"the artifact as AdapterHost serves it (fp32): {tune_effect_lost(host_served, trained, base):.3%}")

    # --- export time ----------------------------------------------------------------------------------------
    print("\n### Export time\n")
    print("| adapter | format | seconds | bytes |\n|---|---|---|---|")
    lora16 = load_adapter(lora_dirs[16])
    for fmt in FORMATS:
        started = time.perf_counter()
        export = write_export(lora16, fmt, root / f"export-{fmt}")
        print(f"| tiny LoRA r=16 | {fmt} | {time.perf_counter() - started:.3f} | {export.nbytes:,} |")
    generator_cpu = torch.Generator().manual_seed(0)
    sdxl_factors = {k[: -len(".weight")]: LoRAFactors(down=torch.randn((16, s[1]), generator=generator_cpu), up=torch.randn((s[0], 16), generator=generator_cpu), alpha=16.0)
                    for k, s in weights.items()}
    sdxl_lora = type(lora16)(manifest=lora16.manifest.model_copy(update={"base_model": "stabilityai/stable-diffusion-xl-base-1.0"}),
                             tensors={**{f"{m}.lora_{ab}.weight": (f.down if ab == "A" else f.up) for m, f in sdxl_factors.items() for ab in "AB"},
                                      "text_encoder.token_embeddings": torch.randn(SUBJECTS, SDXL_TOKEN_WIDTHS[0]),
                                      "text_encoder_2.token_embeddings": torch.randn(SUBJECTS, SDXL_TOKEN_WIDTHS[1])})
    for fmt in ("diffusers", "kohya"):
        started = time.perf_counter()
        export = export_files(sdxl_lora, fmt, layers_per_block=SDXL_UNET["layers_per_block"])
        print(f"| SDXL-shaped LoRA r=16 (in memory) | {fmt} | {time.perf_counter() - started:.3f} | {export.nbytes:,} |")

    # --- compression ------------------------------------------------------------------------------------------
    print(f"\n### Compression of the tiny {args.steps}-step full tune (fidelity: {len(fidelity.seeds)} seeds × 3 prompts, {args.fidelity_steps} steps, 64²)\n")
    print("| setting | ranks | bytes (of full) | min retained energy | SVD s | total s | PSNR dB | max |Δ| |\n|---|---|---|---|---|---|---|---|")
    settings = [("rank", r) for r in (1, 2, 4, 8, 16, 32, 64)] + [("energy", 0.9), ("energy", 0.99)]
    for kind, value in settings:
        if (kind, value) == ("energy", 0.99):
            manifest, seconds = energy, energy_seconds
        else:
            started = time.perf_counter()
            manifest = compress_adapter(full, root / f"{kind}-{value}", generator=generator, fidelity=fidelity, **{kind: value})
            seconds = time.perf_counter() - started
        record = manifest.compressed_from
        ranks = sorted(set(record.ranks.values()))
        psnr = "∞ (identical)" if record.fidelity.psnr_db is None else f"{record.fidelity.psnr_db:.2f}"
        print(f"| {kind} {value} | {ranks[0]}..{ranks[-1]} | {manifest.tensors_bytes / full_bytes:.1%} | {min(record.retained_energy.values()):.4f} "
              f"| {record.seconds:.3f} | {seconds:.2f} | {psnr} | {record.fidelity.max_abs_diff} |")

    counts = collections.Counter(weights.values())
    print("\n### SDXL-shaped SVD (float64, CPU, energy 0.99 of a random ΔW: the rank search runs to near full rank)\n")
    print("| shape | tensors | s each | s total |\n|---|---|---|---|")
    total = 0.0
    for shape, count in sorted(counts.items()):
        delta = torch.randn(shape, generator=generator_cpu) * 1e-3
        started = time.perf_counter()
        factorize(delta, energy=0.99)
        seconds = time.perf_counter() - started
        total += seconds * count
        print(f"| {shape[0]}×{shape[1]} | {count} | {seconds:.2f} | {seconds * count:.1f} |")
    print(f"\nestimated SDXL compression (SVD only, {len(weights)} weights): {total:.0f} s on this CPU")
    print(f"\n(temporary files in {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
