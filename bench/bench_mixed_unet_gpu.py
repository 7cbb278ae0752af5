"""Mixed-adapter LoRA on real SDXL U-Net shapes (issue 15, GPU part): one prepared script, a few minutes.

    .venv/bin/python bench/bench_mixed_unet_gpu.py            # CUDA: SDXL-base U-Net, random weights, fp16, 1024²
    .venv/bin/python bench/bench_mixed_unet_gpu.py --tiny     # CPU smoke run of the same code on the tiny preset

The U-Net is built from the official SDXL config with random weights (no download). Every attn2 projection is
wrapped by `causalt2i.mixed_lora.MixedLoRALinear` with 9 slots of rank 16 (slot 0 = base). Measured, side by side
in one run, median of `--repeats` timed forwards after warm-up:
- batch 8, 8 different adapters (slots 1..8) — the mixed pass;
- batch 8, one adapter in every row (slot 1) through the same layers;
- batch 8, the plain U-Net without the wrappers (what the swap path runs with one merged adapter);
  target: mixed / plain >= 0.9x throughput;
- the activation time of one adapter into a slot: its factors copied from pinned host memory into the stacked
  device buffers in place (what `SlotPool.activate` does on a miss).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (a smoke run, not a measurement)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from causalt2i.mixed_lora import SlotRouter, install_mixed_lora
    from causalt2i.tiny import CONFIG_ROOT, OFFICIAL_SDXL_CONFIGS

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if not cuda:
        torch.set_num_threads(1)
    config_dir = OFFICIAL_SDXL_CONFIGS / "unet" if cuda else CONFIG_ROOT / "tiny" / "unet"
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(config_dir)
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    side = 1024 if cuda else 64
    latent = side // 8
    batch = args.batch

    def inputs():
        generator = torch.Generator(device).manual_seed(1)
        sample = torch.randn(batch, unet.config.in_channels, latent, latent, generator=generator, device=device, dtype=dtype)
        context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator, device=device, dtype=dtype)
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond = {"text_embeds": torch.randn(batch, pooled_dim, generator=generator, device=device, dtype=dtype),
                "time_ids": torch.tensor([side, side, 0, 0, side, side], device=device, dtype=dtype).expand(batch, -1)}
        return sample, torch.full((batch,), 500, device=device), context, cond

    sample, t, context, cond = inputs()

    def timed(repeats: int) -> float:
        times = []
        with torch.no_grad():
            for _ in range(2):
                unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=cond)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=cond)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    plain = timed(args.repeats)
    router = SlotRouter().to(device)
    layers = install_mixed_lora(unet, router, n_slots=batch + 1, r_max=args.rank)
    host_factors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            down = torch.randn(batch, args.rank, layer.base_layer.in_features, dtype=dtype) * 0.01
            up = torch.randn(batch, layer.base_layer.out_features, args.rank, dtype=dtype) * 0.01
            layer.lora_down[1:].copy_(down)
            layer.lora_up[1:].copy_(up)
            layer.lora_scale[1:] = 1.0
            host_factors[name] = (down[0].pin_memory() if cuda else down[0], up[0].pin_memory() if cuda else up[0])
    router.route(list(range(1, batch + 1)))
    mixed = timed(args.repeats)
    router.route([1] * batch)
    single = timed(args.repeats)
    activations = []
    with torch.no_grad():
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for name, layer in layers.items():
                down, up = host_factors[name]
                layer.lora_down[1].copy_(down, non_blocking=True)
                layer.lora_up[1].copy_(up, non_blocking=True)
            if cuda:
                torch.cuda.synchronize()
            activations.append(time.perf_counter() - started)
    slot_bytes = sum((l.lora_down[0].numel() + l.lora_up[0].numel()) * l.lora_down.element_size() for l in layers.values())
    name = torch.cuda.get_device_name() if cuda else "CPU tiny preset (smoke run)"
    print(f"\nMixed-adapter U-Net forward: {name}, {'SDXL-base' if cuda else 'tiny'} U-Net, random weights, {dtype}, "
          f"{side}², batch {batch}, LoRA r={args.rank} on {len(layers)} attn2 projections, median of {args.repeats}")
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    print(f"| plain U-Net (swap path, one merged adapter) | {plain * 1000:.1f} ms | |")
    print(f"| one adapter in all rows, mixed layers | {single * 1000:.1f} ms | |")
    print(f"| {batch} different adapters, mixed layers | {mixed * 1000:.1f} ms | |")
    print(f"| mixed throughput / plain | {plain / mixed:.2f}x | >= 0.9x |")
    print(f"| activation of one adapter into a slot ({slot_bytes / 2**20:.1f} MiB) | {statistics.median(activations) * 1000:.2f} ms | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
