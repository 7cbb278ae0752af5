"""`ct2i`: the platform's command line.

`ct2i train` runs the CausalT2I trainer in this process. The generation commands (`generate`, `eval`),
the adapter commands (`export`, `compress`) and the control-plane commands (`tenants`, `keys`, `submit`, `jobs`, `adapters`, `serve`) register
themselves from their own modules.
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
Environment: CT2I_HOME (data dir, default ~/.ct2i), CT2I_DATABASE_URL, CT2I_API_KEY.
"""

TRAIN_EPILOG = """\
SPEC.yaml (unknown keys are rejected; errors name the field):
  tenant: acme                 # [a-z0-9-]{1,40}
  name: cat-dog                # [a-z0-9-]{1,60}
  base_model: tiny             # or a hub id / local diffusers folder of SDXL
  image_encoder: null          # null = the preset's E_I (CLIP ViT-L/14 for SDXL)
  subjects:                    # 1..8
    - token: "<s1>"            # must be new to the vocabulary
      class_word: cat
      images: [imgs/cat/1.jpg] # 1..32 JPEG/PNG/WebP files, relative to the spec file
  train: {steps: null, lr: 5.0e-5, mask_lr: 1.0e-2, aux_lr: 1.0e-4, alpha: 0.001,
          lambda_attn: 1.0, lambda_text: 0.0, cst_form: shifted, cst_grad: masks,
          gamma: normalized, resolution: 1024, param_mode: full, lora_rank: 16,
          lora_alpha: null, lora_dropout: 0.0, gradient_checkpointing: false,
          checkpoint_every: 100, seed: 0}

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
    parser = argparse.ArgumentParser(prog="ct2i", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Commands of the other layers, registered when their modules are installed."""
    for module_name, function in (("cluster.cli_generate", "add_generation_commands"), ("cluster.cli_portable", "add_portable_commands"), ("cluster.cli_admin", "add_control_plane_commands"), ("serve.cli", "add_serve_commands")):
        try:
            module = __import__(module_name, fromlist=[function])
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        getattr(module, function)(sub)


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
