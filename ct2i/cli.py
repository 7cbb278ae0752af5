"""`ct2i`: the platform's command line.

`ct2i train` runs the CausalT2I trainer in this process. The generation commands (`generate`, `eval`,
`ct2i.cli_generate`), the adapter commands (`export`, `compress`, `ct2i.cli_portable`), the control-plane commands (`tenants`, `keys`, `submit`, `jobs`, `adapters`,
`ct2i.cli_platform`) and `serve` (`ct2i.cli_serve`) register themselves from their modules.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_SIGINT = 128 + 2
EXIT_SIGTERM = 128 + 15

DESCRIPTION = """\
CausalT2I platform: fine-tune SDXL on a few photos of your subjects, then generate them together.

Start with `ct2i train SPEC.yaml --out DIR` (see `ct2i train --help` for the spec format).
Models: 'tiny' (offline, random weights, for tests and demos), a hub id, or a local SDXL folder.
Environment: CT2I_HOME (data dir, default ~/.ct2i), CT2I_DATABASE_URL, CT2I_API / CT2I_API_KEY (a remote
control plane); every setting: `cluster.config` (CT2I_ prefix, sections with __).
"""

TRAIN_EPILOG = """\
SPEC.yaml (unknown keys are rejected; errors name the field):
  tenant: acme                 # [a-z0-9-]{1,40}
  name: cat-dog                # [a-z0-9-]{1,60}
  base_model: tiny             # or a hub id / local diffusers folder of SDXL
  image_encoder: null          # null = the preset's E_I (CLIP ViT-L/14 for SDXL)
  vae: null                    # null = the base's VAE; e.g. madebyollin/sdxl-vae-fp16-fix
  subjects:                    # 1..8
    - token: "<s1>"            # must be new to the vocabulary
      class_word: cat
      images: [imgs/cat/1.jpg] # 1..32 JPEG/PNG/WebP files, relative to the spec file
  train: {steps: null, lr: 5.0e-5, mask_lr: 1.0e-2, aux_lr: 1.0e-4, alpha: auto,
          alpha_scale: 1.0, alpha_warmup: null, lambda_attn: 1.0, lambda_text: 0.0, cst_form: shifted,
          cst_grad: masks, gamma: normalized, resolution: 1024, param_mode: full,
          lora_rank: 16, lora_alpha: null, lora_dropout: 0.0, gradient_checkpointing: false,
          dtype_policy: auto,
          checkpoint_every: 100, log_every: 10, seed: 0}
  # alpha: auto calibrates L_cst's weight over the first alpha_warmup steps (null = min(300, 20%)),
  # times alpha_scale (what a search over alpha samples: search.alpha_scale, default 0.1..10);
  # dtype_policy: auto = bf16 frozen weights with fp32 trainable masters on CUDA, fp32 on CPU.
  # `ct2i plan SPEC.yaml` prints the GPU memory this spec needs.

The run folder DIR gets spec.json, checkpoints/, metrics.jsonl and, when done, adapter/
(adapter.safetensors + manifest.json). The adapter's path is printed last on stdout.

Stopping: --max-steps K stops once the run reaches step K and leaves a checkpoint. SIGTERM or
Ctrl-C finishes the current step, writes a checkpoint and exits. Either way, `--resume` continues
exactly where it stopped.

Exit status: 0 done, 2 bad input (one line on stderr; DIR is left untouched), 3 stopped at
--max-steps, 130 stopped by Ctrl-C, 143 stopped by SIGTERM.
"""


def _fail(message: str) -> int:
    print(f"ct2i: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    from causalt2i.callbacks import JsonlMetricsCallback, ProgressCallback
    from causalt2i.data.images import ImageInputError
    from causalt2i.models import ModelLoadError
    from causalt2i.spec import SpecError, load_spec
    from causalt2i.trainer import train

    out = Path(args.out)
    existed = out.exists()
    try:
        spec = load_spec(args.spec)
        if args.max_steps is not None and args.max_steps <= 0:
            raise SpecError("--max-steps", "must be a positive number of steps")
        progress = ProgressCallback(spec.total_steps)
        callbacks = [progress, _DeferredJsonl(out, JsonlMetricsCallback)]
        result = train(spec, out, resume=args.resume, max_steps=args.max_steps, callbacks=callbacks, device=args.device)
        progress.close()
    except (SpecError, ImageInputError, ModelLoadError) as err:
        if not existed and out.exists() and not any((out / "checkpoints").glob("step-*")):
            shutil.rmtree(out, ignore_errors=True)
        return _fail(str(err))
    if result.stopped_early:
        print(f"stopped at step {result.step}/{result.total_steps} ({result.stop_reason}); continue with: ct2i train {args.spec} --out {out} --resume", file=sys.stderr)
        return {"sigterm": EXIT_SIGTERM, "sigint": EXIT_SIGINT}.get(result.stop_reason, EXIT_STOPPED)
    print(result.adapter_dir)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from causalt2i.plan import PlanError, check_plan_fits, format_plan, gpu_memory_gb
    from causalt2i.spec import SpecError, parse_spec

    path = Path(args.spec)
    try:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise SpecError("", f"cannot read spec {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise SpecError("", f"{path} is not valid YAML: {err}") from None
        # The plan needs the shapes, not the photos: image files are not read.
        spec = parse_spec(data, base_dir=path.parent, check_files=False)
        memory = args.gpu_memory_gb if args.gpu_memory_gb is not None else gpu_memory_gb()

        def progress(done: int, total: int, label: str) -> None:
            print(f"measuring {done + 1}/{total}: {label} ...", file=sys.stderr, flush=True)

        print(format_plan(spec, memory, progress), flush=True)
        check_plan_fits(spec, memory)
    except (SpecError, PlanError) as err:
        return _fail(str(err))
    return 0


class _DeferredJsonl:
    """Opens metrics.jsonl only once training runs, so a refused spec leaves the folder untouched."""

    def __init__(self, out: Path, factory):
        self.out = out
        self.factory = factory
        self.inner = None

    def on_step(self, info) -> None:
        if self.inner is None:
            self.inner = self.factory(self.out / "metrics.jsonl")
        self.inner.on_step(info)


def build_parser() -> argparse.ArgumentParser:
    from ct2i.cli_platform import add_client_flags

    parser = argparse.ArgumentParser(prog="ct2i", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_client_flags(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_parser = sub.add_parser(
        "train",
        help="fine-tune SDXL with CausalT2I on a spec, in this process",
        description="Fine-tune SDXL with CausalT2I on the subjects of SPEC.yaml, in this process (CPU or one CUDA GPU).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("spec", help="the tuning spec (YAML)")
    train_parser.add_argument("--out", required=True, help="run folder: checkpoints, logs and the adapter go here")
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train_parser.add_argument("--max-steps", type=int, default=None, metavar="K", help="stop once the run reaches step K, leaving a resumable checkpoint")
    train_parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    train_parser.set_defaults(func=cmd_train)
    plan_parser = sub.add_parser(
        "plan",
        help="print a spec's GPU memory plan (real model shapes on the meta device; no GPU, no download)",
        description="Print the structure of the spec's base model (parameter counts, watched attn2 layers, adapter size) "
        "and its GPU memory plan for every (param_mode, dtype_policy, gradient_checkpointing), built from the real "
        "configs on the meta device. Exit 0 if the spec's own plan fits its resources.gpus_per_worker share of a GPU, "
        "2 if it does not (the control plane refuses such a spec at submit).",
    )
    plan_parser.add_argument("spec", help="the tuning spec (YAML); image files are not read")
    plan_parser.add_argument("--gpu-memory-gb", type=float, default=None, metavar="GB", help="memory of one GPU (default: $CT2I_GPU_MEMORY_GB or 80)")
    plan_parser.set_defaults(func=cmd_plan)
    _register_commands(sub)
    return parser


def _register_commands(sub) -> None:
    from ct2i.cli_generate import add_generation_commands
    from ct2i.cli_platform import add_control_plane_commands
    from ct2i.cli_portable import add_portable_commands
    from ct2i.cli_serve import add_serve_commands

    add_generation_commands(sub)
    add_portable_commands(sub)
    add_control_plane_commands(sub)
    add_serve_commands(sub)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
