"""Every module a Train worker imports is read from compiled bytecode that matches its source.

This machine (like many CI and container images) sets PYTHONDONTWRITEBYTECODE=1, so Python never writes a .pyc
itself: without the ones `make setup` writes at install (uv's --compile-bytecode), each Ray worker compiled torch,
transformers, diffusers and Ray from source, and `import tune.worker` took 26 s instead of 10 s (BENCHMARKS, time to
first step). The check reads each .pyc header as the import system does (flags 0: source mtime and size).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import sysconfig
from pathlib import Path


def _stale_or_missing_bytecode(module_file: str) -> str | None:
    cached = Path(importlib.util.cache_from_source(module_file))
    if not cached.exists():
        return "no .pyc"
    header = cached.read_bytes()[:16]
    if header[:4] != importlib.util.MAGIC_NUMBER:
        return "a .pyc of another Python"
    flags, mtime, size = struct.unpack("<III", header[4:16])
    if flags & 0b1:  # hash-based (SOURCE_DATE_EPOCH builds): valid while the source's hash matches
        return None if header[8:16] == importlib.util.source_hash(Path(module_file).read_bytes()) else "a stale .pyc"
    source = os.stat(module_file)
    if mtime != int(source.st_mtime) & 0xFFFFFFFF or size != source.st_size & 0xFFFFFFFF:
        return "a stale .pyc"
    return None


def test_the_train_workers_imports_are_all_precompiled():
    import deepspeed  # noqa: F401  (imported by tune.engine when the engine is attached)

    import tune.worker  # noqa: F401  (what a Train worker imports: ray.train, torch, peft, diffusers)

    site_packages = sysconfig.get_path("purelib")
    modules = {name: module.__file__ for name, module in list(sys.modules.items())
               if getattr(module, "__file__", None) and module.__file__.startswith(site_packages)
               and module.__file__.endswith(".py")}
    for heavy in ("torch", "ray.train", "deepspeed", "diffusers", "transformers", "peft"):
        assert heavy in modules, f"{heavy} was not imported from {site_packages}"
    problems = {name: why for name, file in modules.items() if (why := _stale_or_missing_bytecode(file))}
    assert not problems, (f"{len(problems)} of {len(modules)} modules would be compiled from source at every worker "
                          f"start (run `make setup`): {dict(list(problems.items())[:10])}")


def test_the_check_sees_a_missing_and_a_stale_pyc(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("X = 1\n")
    assert _stale_or_missing_bytecode(str(source)) == "no .pyc"
    import py_compile

    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    assert _stale_or_missing_bytecode(str(source)) is None
    source.write_text("X = 22\n")  # edited after compiling: a different size
    assert _stale_or_missing_bytecode(str(source)) == "a stale .pyc"
