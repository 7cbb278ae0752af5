"""`ct2i export` and `ct2i compress`: take a local adapter folder to other tools, or a full tune to LoRA.

The bodies are `causalt2i.export.write_export` and `causalt2i.compress.compress_adapter`; this module only
parses, reports and maps refusals to one line on stderr naming the field, with exit status 2. Nothing is
written unless the input is accepted, and an export or compressed adapter appears whole or not at all.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2

EXPORT_EPILOG = """\
Formats:
  diffusers   pytorch_lora_weights.safetensors (diffusers/peft names, rank and alpha in its header) for
              StableDiffusionXLPipeline.load_lora_weights, plus embeddings/
  kohya       NAME.safetensors in kohya's SDXL layout (lora_unet_..., lora_down / lora_up / alpha), which
              ComfyUI, Automatic1111 and diffusers load, plus embeddings/
  embeddings  embeddings/TOKEN.safetensors: one SDXL textual inversion per identifier token, with clip_l
              and clip_g rows, for load_textual_inversion, Automatic1111 and ComfyUI

Every export has a README.md naming the tokens, the prompts that use them, the base model and its
fingerprint, and the diffusers code that reproduces `ct2i generate`. A full-mode adapter has no LoRA
form: compress it first (`ct2i compress`), then export the compressed adapter.

Exit status: 0 done (the export folder is printed), 2 bad input (one line on stderr; nothing written).
"""

COMPRESS_EPILOG = """\
Each attn2 weight change dW = W_tuned - W_base is replaced by its truncated SVD: --rank R keeps the R
largest singular values of every tensor; --energy E keeps, per tensor, the fewest that retain a fraction
E of dW's Frobenius energy (0.99 is a good start). The base (the adapter's, or --base-model) is loaded to
check its fingerprint and to measure fidelity: the prompts are generated with the full and the
compressed adapter from the same seeds, and the PSNR and max |delta| of the images go into the new
adapter's manifest (compressed_from.fidelity), with the ranks and the energy kept per tensor.

Exit status: 0 done (the new adapter folder is printed), 2 bad input (one line on stderr; nothing written).
"""


def add_portable_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `export` and `compress` on a `ct2i` argparse subparsers object."""
    export = subparsers.add_parser(
        "export",
        help="export an adapter for diffusers, ComfyUI / Automatic1111 (kohya) or as textual inversions",
        description="Export a local adapter folder (manifest.json + adapter.safetensors) into a new folder for another tool.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    export.add_argument("--format", required=True, metavar="FORMAT", help="diffusers, kohya or embeddings")
    export.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder to write the export to")
    export.set_defaults(func=run_export)

    compress = subparsers.add_parser(
        "compress",
        help="compress a full-mode adapter into a LoRA adapter (truncated SVD), measuring its fidelity",
        description="Turn a full-mode adapter into a LoRA adapter by a truncated SVD of each attn2 weight change.",
        epilog=COMPRESS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compress.add_argument("adapter", metavar="ADAPTER", help="a full-mode adapter folder")
    compress.add_argument("--rank", type=int, default=None, metavar="R", help="keep R singular values per tensor")
    compress.add_argument("--energy", type=float, default=None, metavar="E", help="keep the fewest singular values that retain E (0 < E <= 1) of each tensor's energy")
    compress.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder for the compressed adapter")
    compress.add_argument("--base-model", default=None, help="the base to check and generate with (default: the adapter's)")
    compress.add_argument("--seeds", default="0,1", help="comma-separated seeds of the fidelity images (default 0,1)")
    compress.add_argument("--steps", type=int, default=30, help="sampling steps of the fidelity images (default 30)")
    compress.add_argument("--device", default=None, help="torch device for the fidelity images (default: cuda if available, else cpu)")
    compress.set_defaults(func=run_compress)


def _fail(command: str, field: str, message: str) -> int:
    print(f"ct2i {command}: {field}: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_export(args: argparse.Namespace) -> int:
    from causalt2i.adapter import AdapterError
    from causalt2i.export import ExportError, check_format, write_export
    from causalt2i.models import ModelLoadError

    try:
        check_format(args.format)  # before the adapter is read, so a typo costs nothing
        write_export(args.adapter, args.format, args.out)
    except ExportError as err:
        return _fail("export", err.field, err.message)
    except AdapterError as err:
        return _fail("export", "adapter", str(err))
    except ModelLoadError as err:
        return _fail("export", "base_model", str(err))
    print(args.out)
    return EXIT_OK


def _seeds(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"expected comma-separated non-negative integers, got {text!r}")
    return tuple(int(part) for part in parts)


def run_compress(args: argparse.Namespace) -> int:
    from causalt2i.adapter import AdapterError
    from causalt2i.compress import CompressionError, FidelityConfig, check_options, compress_adapter
    from causalt2i.generation import MAX_STEPS
    from causalt2i.models import ModelLoadError
    from ct2i.cli_generate import _progress_bar, _quiet_libraries

    try:
        check_options(args.rank, args.energy)
        seeds = _seeds(args.seeds)
    except CompressionError as err:
        return _fail("compress", err.field, err.message)
    except ValueError as err:
        return _fail("compress", "seeds", str(err))
    if not 1 <= args.steps <= MAX_STEPS:
        return _fail("compress", "steps", f"must be within 1..{MAX_STEPS}, got {args.steps}")
    import torch

    _quiet_libraries()
    # The base loads in fp32 on any device: ΔW and the fidelity images are computed in fp32.
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress, close = _progress_bar(None, "tensor")
    try:
        manifest = compress_adapter(
            args.adapter, args.out, rank=args.rank, energy=args.energy, base_model=args.base_model,
            fidelity=FidelityConfig(seeds=seeds, steps=args.steps), device=device, progress=progress,
        )
    except CompressionError as err:
        return _fail("compress", err.field, err.message)
    except AdapterError as err:
        return _fail("compress", "adapter", str(err))
    except ModelLoadError as err:
        return _fail("compress", "base_model", str(err))
    finally:
        close()
    record = manifest.compressed_from
    fidelity = record.fidelity
    psnr = "identical images" if fidelity.psnr_db is None else f"PSNR {fidelity.psnr_db:.2f} dB"
    print(f"{manifest.tensors_bytes:,} bytes ({manifest.tensors_bytes / record.full_bytes:.1%} of the full adapter), ranks "
          f"{min(record.ranks.values())}..{max(record.ranks.values())}; against the full adapter: {psnr}, max |delta| {fidelity.max_abs_diff}/255", file=sys.stderr)
    print(args.out)
    return EXIT_OK
