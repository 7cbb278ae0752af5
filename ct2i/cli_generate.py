"""`ct2i generate` and `ct2i eval`: generation and evaluation of one adapter folder, on this machine.

Both load the adapter's base (`--base-model` overrides the manifest's), apply the adapter in place and
run `causalt2i.generation` / `causalt2i.evaluate`. Bad input gets one line on stderr that names the
field, and exit status 2; nothing already on disk is touched before the input is accepted.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from causalt2i.errors import FieldError, field_error

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class _InputError(FieldError):
    pass


def add_generation_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `eval` on a `ct2i` argparse subparsers object."""
    generate = subparsers.add_parser(
        "generate",
        help="generate images with an adapter",
        description="Generate images from a tuned adapter. Prompts use its identifier tokens, e.g. 'a <s1> cat and a <v1> dog'. "
        "A prompt over 77 tokens is an error, not truncated.",
    )
    generate.add_argument("--adapter", required=True, help="adapter folder (manifest.json + adapter.safetensors)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--steps", type=int, default=30, help="DPM-Solver++ steps, 1..200 (default 30)")
    generate.add_argument("--guidance", type=float, default=7.5, help="CFG scale, 0..30 (default 7.5; <= 1 disables CFG)")
    generate.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    generate.add_argument("--n", type=int, default=1, help="number of images, 1..16; n > 1 writes OUT-0.png, OUT-1.png, ...")
    generate.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the base's native size)")
    generate.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the base's native size)")
    generate.add_argument("--base-model", default=None, help="override the manifest's base model ('tiny', hub id or folder)")
    generate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    generate.add_argument("--out", required=True, help="output PNG path")
    generate.set_defaults(func=run_generate)

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate an adapter (CLIP-I, CLIP-T, LPIPS, KID) and write metrics.json and report.png",
        description="Generate the paper-style prompts for the adapter's subjects with each seed, score them against "
        "the subjects' reference images, and write metrics.json, report.png and the images.",
    )
    evaluate.add_argument("--adapter", required=True, help="adapter folder")
    evaluate.add_argument("--prompts", default=None, help="text file, one prompt per line ('{subjects}' is filled in); default: the paper-style templates")
    evaluate.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    evaluate.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds, one image per prompt per seed")
    evaluate.add_argument("--steps", type=int, default=30)
    evaluate.add_argument("--guidance", type=float, default=7.5)
    evaluate.add_argument("--negative-prompt", default="")
    evaluate.add_argument("--width", type=int, default=None)
    evaluate.add_argument("--height", type=int, default=None)
    evaluate.add_argument(
        "--references",
        default=None,
        help="a spec file (YAML/JSON) or a folder holding spec.json/spec.yaml, whose subjects' images are the references; "
        "default: the run's spec.json one folder above the adapter",
    )
    evaluate.add_argument("--metrics-config", default=None, help="YAML with clip / inception / lpips_trunk / lpips_linear sources (default: tiny)")
    evaluate.add_argument("--base-model", default=None, help="override the manifest's base model")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--out", default=None, help="output folder (default: 'eval' beside the adapter folder)")
    evaluate.set_defaults(func=run_eval)


def _fail(command: str, field: str, message: str) -> int:
    first_line = " ".join(str(message).split())
    print(f"ct2i {command}: {field}: {first_line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _field_and_message(err: FieldError) -> tuple[str, str]:
    return err.field or "input", err.message


def _progress_bar(total: int | None, unit: str):
    """A tqdm bar on a TTY (stderr), and nothing otherwise; returns (callback, close).

    The callback takes (done, total) and adopts a total that was not known when the bar started.
    """
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, file=sys.stderr)

    def update(done: int, total_now: int) -> None:
        if bar.total != total_now:
            bar.total = total_now
        bar.update(done - bar.n)

    return update, bar.close


def _device_and_dtype(device: str | None):
    import torch

    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 on a GPU is what SDXL inference runs in; the CPU stays in fp32 (bf16 CPU kernels are slow).
    return resolved, (torch.bfloat16 if resolved.type == "cuda" else None)


def _quiet_libraries() -> None:
    """The CLI's stderr is for our one-line errors and the progress bar; library notices are noise there."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def _load(adapter_dir: str, base_model: str | None, device: str | None):
    from causalt2i.adapter import load_adapter
    from causalt2i.generation import Generator
    from causalt2i.models import load_sdxl

    adapter = load_adapter(adapter_dir)
    resolved, dtype = _device_and_dtype(device)
    on_cpu = resolved.type == "cpu" and dtype is None  # models load on the CPU in fp32 already
    parts = load_sdxl(base_model or adapter.manifest.base_model, device=None if on_cpu else resolved, dtype=dtype)
    generator = Generator(parts)
    generator.use(adapter)
    return adapter, generator


def _numbered(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}") for index in range(count)]


def run_generate(args: argparse.Namespace) -> int:
    from causalt2i.adapter import AdapterError
    from causalt2i.atomic import atomic_write_bytes
    from causalt2i.generation import GenerationError, parse_request
    from causalt2i.models import ModelLoadError
    from causalt2i.text import PromptError

    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "n": args.n,
        "width": args.width,
        "height": args.height,
    }
    _quiet_libraries()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return _fail("generate", "out", f"must be a .png path, got {args.out!r}")
    try:
        parse_request(fields)  # the base-independent checks, before anything is loaded
        adapter, generator = _load(args.adapter, args.base_model, args.device)
        progress, close = _progress_bar(args.steps, "step")
        try:
            result = generator(fields, progress=progress)
        finally:
            close()
    except AdapterError as err:
        return _fail("generate", "adapter", str(err))
    except ModelLoadError as err:
        return _fail("generate", "base_model", str(err))
    except (GenerationError, PromptError) as err:
        return _fail("generate", *_field_and_message(err))
    paths = _numbered(out, len(result.images))
    for path, image in zip(paths, result.images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        print(path)
    return EXIT_OK


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _InputError("seeds", f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise _InputError("seeds", "give at least one seed")
    return seeds


def _metric_suite(path: str | None, device):
    from causalt2i.metrics.extractors import MetricsConfig, MetricSuite

    if path is None:
        return MetricSuite.tiny(0).to(device)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise _InputError("metrics_config", f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise _InputError("metrics_config", f"{path} must be a mapping of clip / inception / lpips_trunk / lpips_linear")
    try:
        config = MetricsConfig.model_validate(data)
    except ValidationError as err:
        found = field_error(err, prefix="metrics_config")
        raise _InputError(found.field, found.message) from None
    return MetricSuite.from_config(**config.model_dump(), device=device)


def run_eval(args: argparse.Namespace) -> int:
    from causalt2i.adapter import AdapterError, read_manifest
    from causalt2i.evaluate import (
        METRICS_FILE,
        REPORT_FILE,
        EvalConfig,
        default_references,
        evaluate_adapter,
        load_references,
        read_prompts_file,
    )
    from causalt2i.generation import GenerationError
    from causalt2i.models import ModelLoadError
    from causalt2i.text import PromptError

    _quiet_libraries()
    adapter_dir = Path(args.adapter)
    out = Path(args.out) if args.out else adapter_dir.resolve().parent / "eval"
    try:
        seeds = _parse_seeds(args.seeds)
        prompts = read_prompts_file(args.prompts) if args.prompts else None
        try:
            config = EvalConfig(
                prompts=prompts,
                max_prompts=args.max_prompts,
                seeds=seeds,
                steps=args.steps,
                guidance=args.guidance,
                negative_prompt=args.negative_prompt,
                width=args.width,
                height=args.height,
            )
        except ValidationError as err:
            found = field_error(err)
            raise _InputError(found.field.split(".")[0], found.message) from None
        manifest = read_manifest(adapter_dir)
        references_source = args.references or default_references(adapter_dir)
        if references_source is None:
            raise _InputError("references", f"no spec.json beside {adapter_dir}; pass --references SPEC_OR_FOLDER")
        references = load_references(references_source, manifest.subjects)
        adapter, generator = _load(args.adapter, args.base_model, args.device)
        suite = _metric_suite(args.metrics_config, generator.parts.device)
        progress, close = _progress_bar(None, "prompt")
        try:
            report = evaluate_adapter(generator, adapter, references, suite, config, out, progress=progress)
        finally:
            close()
    except _InputError as err:
        return _fail("eval", err.field, err.message)
    except AdapterError as err:
        return _fail("eval", "adapter", str(err))
    except ModelLoadError as err:
        return _fail("eval", "base_model", str(err))
    except (GenerationError, PromptError) as err:
        return _fail("eval", *_field_and_message(err))
    overall = report.overall
    kid_text = "n/a" if overall.kid is None else f"{overall.kid:.4f}"
    print(f"CLIP-I {overall.clip_i:.4f}  CLIP-T {overall.clip_t:.4f}  LPIPS {overall.lpips:.4f}  KID {kid_text}")
    for token, row in report.subjects.items():
        row_kid = "n/a" if row.kid is None else f"{row.kid:.4f}"
        print(f"  {token} ({row.class_word}): CLIP-I {row.clip_i:.4f}  CLIP-T {row.clip_t:.4f}  LPIPS {row.lpips:.4f}  KID {row_kid}")
    print(out / METRICS_FILE)
    print(out / REPORT_FILE)
    return EXIT_OK
