"""`python -m ct2i.demo --out DIR` removes only a folder it made (issue 13, item 9): a marker file decides."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ct2i.demo import MARKER, ForeignFolder, prepare_out
from tests.conftest import REPO_ROOT


def test_the_demo_refuses_to_remove_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = subprocess.run([sys.executable, "-m", "ct2i.demo", "--out", str(mine)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to remove" in result.stdout and MARKER in result.stdout
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_a_new_folder_gets_the_marker_and_a_marked_one_is_replaced(tmp_path):
    out = tmp_path / "demo-out"
    prepare_out(out)
    assert (out / MARKER).is_file()
    (out / "cat-dog.png").write_bytes(b"old run")
    prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_an_empty_folder_is_adopted(tmp_path):
    prepare_out(tmp_path)
    assert (tmp_path / MARKER).is_file()


@pytest.mark.parametrize("kind", ["file", "symlink", "marker-symlink"])
def test_files_links_and_linked_markers_are_refused(tmp_path, kind):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    elif kind == "symlink":
        out.symlink_to(target)
    else:
        target_marker = tmp_path / "elsewhere"
        target_marker.write_text("")
        (target / MARKER).symlink_to(target_marker)
        out = target
    with pytest.raises(ForeignFolder):
        prepare_out(out)
    assert (target / "keep").read_text() == "x"
