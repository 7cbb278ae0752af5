"""Training checkpoints: everything an exact resume needs, written atomically as one folder.

Layout: `<run>/checkpoints/step-00000042/{state.pt, meta.json}`. The folder is written under a temp
name and renamed into place, with `meta.json` written last inside it; a folder without `meta.json` is
ignored. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from causalt2i.atomic import atomic_open, atomic_write_text, fsync_dir

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, meta: dict, *, keep: int = 2) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        with atomic_open(tmp / STATE_FILE) as handle:
            torch.save(state, handle)
        atomic_write_text(tmp / META_FILE, json.dumps({"step": step, **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / META_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return state, meta
