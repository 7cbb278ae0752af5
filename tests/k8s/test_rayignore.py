"""`ray job submit --working-dir .` uploads the sources a job needs and nothing else, judged by Ray's own
packaging code with .rayignore alone (.gitignore can be switched off)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import REPO_ROOT


def _uploaded(root: Path) -> set[str]:
    from ray._private.runtime_env.packaging import _dir_travel

    files: set[str] = set()
    _dir_travel(root.absolute(), [], lambda p: p.is_file() and files.add(str(p.relative_to(root.absolute()))),
                include_gitignore=False)
    return files


def test_rayignore_on_a_tree_with_everything_a_checkout_accumulates(tmp_path):
    shutil.copy(REPO_ROOT / ".rayignore", tmp_path / ".rayignore")
    kept = {"causalt2i/data/merge.py", "tune/job.py", "serve/config.yaml", "pyproject.toml", "batch.yaml"}
    dropped = {".venv/lib/python3.11/site-packages/torch/x.py", ".git/objects/ab/cd", "tune/__pycache__/job.cpython-311.pyc",
               ".pytest_cache/v/cache", "out/run/checkpoints/step-10/model.safetensors", "data/cat/1.jpg", "demo-out/a.png",
               "tests/k8s/test_x.py", "docs/operators.md", "k8s/base/rayservice.yaml", "weights/unet.bin", "x.egg-info/PKG-INFO"}
    for name in kept | dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert _uploaded(tmp_path) - {".rayignore"} == kept


def test_repository_upload_stays_small():
    files = _uploaded(REPO_ROOT)
    assert not [f for f in files if f.startswith((".venv/", ".git/", "tests/", "k8s/"))]
    assert any(f.startswith("causalt2i/") for f in files)
    size = sum((REPO_ROOT / f).stat().st_size for f in files)
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB would be uploaded"
