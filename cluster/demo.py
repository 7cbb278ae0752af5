"""`make demo`: the platform's main job on the embedded default, end to end, on this machine.

Today: synthetic subjects → `ct2i train` (tiny preset) → an adapter. Each layer adds its step here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from causalt2i.data.synthetic import write_synthetic_spec

DEFAULT_OUT = Path("demo-out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="demo folder (replaced on each run)")
    parser.add_argument("--steps", type=int, default=40, help="training steps on the tiny preset")
    args = parser.parse_args(argv)

    from cluster.cli import main as ct2i

    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    spec_path = write_synthetic_spec(args.out / "subjects", tenant="demo", name="cat-dog", resolution=64, steps=args.steps, n_subjects=2, gpus_per_worker=0)
    print(f"[demo] synthetic subjects and spec: {spec_path}", flush=True)
    code = ct2i(["train", str(spec_path), "--out", str(args.out / "run")])
    if code != 0:
        print(f"[demo] training failed with exit status {code}", file=sys.stderr)
        return code
    print(f"[demo] done in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"[demo] run folder:  {args.out / 'run'} (checkpoints/, metrics.jsonl)")
    print(f"[demo] adapter:     {args.out / 'run' / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
