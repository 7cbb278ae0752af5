"""DeepSpeed's JIT-built CPU op (`deepspeed_shm_comm`, its shared-memory collectives), built once at `make setup`.

DeepSpeed's CPU backend compiles this op with ninja the first time a process initialises DeepSpeed, into
`TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`). That build took 54 s of a tiny tune's
start-up on the 2-core CI machine, and a home-wide cache is rebuilt whenever another virtual environment
(another checkout, another torch) builds the same op there. So the build directory defaults to one inside
this virtual environment, `make setup` fills it (`python -m tune.ds_ops`), and every run loads it from
there: the later load only checks the build is current and opens the shared object.

torch runs whichever `ninja` is first on PATH, and ninja 1.12+ keeps its build log in a format older ninjas discard
(and the reverse): a process whose PATH has this environment's `bin/` (an activated venv, `make cluster-demo`) and
one whose PATH does not (`.venv/bin/python -m ...`, a Ray worker started by `.venv/bin/ray`) meet the system's
ninja and this environment's in turn, and each rebuilt the op — 70–83 s inside a tune's start-up, seen in CI after
`make cluster-demo`. So every build and load here uses this environment's ninja (the `ninja` package DeepSpeed
depends on), whatever the caller's PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def default_extensions_dir() -> Path:
    return Path(sys.prefix) / "torch_extensions"


def use_prebuilt_ops() -> str:
    """Point torch's extension builds at this environment's prebuilt folder unless one is named already, and
    clear build locks their builders left behind (see `clear_stale_build_locks`)."""
    where = os.environ.setdefault(EXTENSIONS_ENV, str(default_extensions_dir()))
    pin_ninja()
    for lock in clear_stale_build_locks(Path(where)):
        print(f"tune.ds_ops: removed a stale build lock no process holds: {lock}", file=sys.stderr, flush=True)
    return where


def environment_ninja() -> Path | None:
    """The ninja binary of this environment's `ninja` package, or None where the package is not installed."""
    try:
        import ninja
    except ImportError:
        return None
    binary = Path(ninja.BIN_DIR) / "ninja"
    return binary if binary.exists() else None


def pin_ninja() -> Path | None:
    """Put this environment's ninja first on this process's PATH (which torch's builds search), unless it is
    already the one found; returns the ninja that builds will run."""
    binary = environment_ninja()
    if binary is None:
        found = shutil.which("ninja")
        return Path(found) if found else None
    found = shutil.which("ninja")
    if found is None or Path(found).resolve() != binary.resolve():
        os.environ["PATH"] = os.pathsep.join([str(binary.parent), os.environ.get("PATH", "")])
    return binary


def clear_stale_build_locks(extensions_dir: Path) -> list[Path]:
    """Remove the `<op>/lock` files in `extensions_dir` that no process on this machine holds open.

    torch's JIT build (`torch.utils.file_baton.FileBaton`) creates the lock with O_EXCL and keeps it open until
    the build ends; a builder killed mid-build leaves it behind, and every later load of the op then waits on it
    forever (a tune sat at DeepSpeed initialisation with no message). A live builder always has its lock open,
    so a lock nobody holds is stale. Only where /proc lists open files (Linux), and only this user's locks;
    elsewhere nothing is removed."""
    locks = sorted(extensions_dir.glob("*/lock"))
    proc = Path("/proc")
    if not locks or not (proc / "self" / "fd").is_dir():
        return []
    held: set[str] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    continue
        except OSError:  # the process ended, or is not ours to read
            continue
    removed = []
    for lock in locks:
        # Another user's lock may be held by a process whose open files we cannot read: left alone.
        if lock.stat().st_uid == os.getuid() and str(lock.resolve()) not in held:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def build_ops() -> list[str]:
    """Build (or confirm) every JIT op this platform's DeepSpeed path loads on this machine's accelerator."""
    use_prebuilt_ops()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    built = []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
        built.append(builder.absolute_name())
    return built


def main() -> None:
    started = time.perf_counter()
    built = build_ops()
    where = os.environ[EXTENSIONS_ENV]
    names = ", ".join(built) or "none needed on this accelerator"
    print(f"DeepSpeed ops in {where}: {names}, ninja {shutil.which('ninja')} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
