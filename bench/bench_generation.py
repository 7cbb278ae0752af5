"""Generation throughput and adapter-switch cost on the tiny preset (CPU by default).

    .venv/bin/python bench/bench_generation.py [--steps 30] [--n 4] [--size 64] [--repeats 3]

Prints a table: images/s for a CFG generation of `--n` images, and the time of one adapter switch
(from the host cache, and from the adapter folder including the sha256 check and load) as a fraction of
one generation. No assertions; record the figures in BENCHMARKS.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causalt2i.adapter import load_adapter  # noqa: E402
from causalt2i.adapter_cache import AdapterCache  # noqa: E402
from causalt2i.data.synthetic import write_synthetic_spec  # noqa: E402
from causalt2i.generation import Generator  # noqa: E402
from causalt2i.models import load_sdxl  # noqa: E402
from causalt2i.spec import load_spec  # noqa: E402
from causalt2i.trainer import train  # noqa: E402


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = []
        for index in range(2):
            spec = load_spec(write_synthetic_spec(Path(tmp) / f"spec{index}", name=f"bench-{index}", seed=index, steps=1))
            adapter_dirs.append(train(spec, Path(tmp) / f"run{index}").adapter_dir)
        generator = Generator(load_sdxl("tiny"))
        cache = AdapterCache(1 << 30)
        adapters = [cache.get(str(path), path) for path in adapter_dirs]
        request = {"prompt": "a <s1> cat and a <v1> dog in a garden", "steps": args.steps, "n": args.n, "width": args.size, "height": args.size}

        generator.use(adapters[0])
        generator(request)  # warm-up: first calls allocate and pick kernels
        generate_s = _median_seconds(lambda: generator(request), args.repeats)

        flips = iter(range(10**9))

        def switch_cached() -> None:
            generator.use(adapters[(next(flips) + 1) % 2])  # starts from adapter 0, so every call is a real switch

        def switch_from_file() -> None:
            generator.use(load_adapter(adapter_dirs[next(flips) % 2]))

        switch_cached_s = _median_seconds(switch_cached, max(args.repeats, 5))
        switch_file_s = _median_seconds(switch_from_file, max(args.repeats, 5))

    rows = [
        ("device", "cpu", f"{torch.get_num_threads()} threads"),
        ("generation", f"{generate_s:.3f} s", f"{args.n} images {args.size}x{args.size}, {args.steps} steps, CFG"),
        ("images/s", f"{args.n / generate_s:.2f}", ""),
        ("switch (cached)", f"{switch_cached_s * 1e3:.2f} ms", f"{switch_cached_s / generate_s:.2%} of one generation"),
        ("switch (from file)", f"{switch_file_s * 1e3:.2f} ms", f"{switch_file_s / generate_s:.2%} of one generation"),
        ("adapter size", f"{adapters[0].nbytes / 1e6:.2f} MB", "tensors in host memory"),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'measure':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
