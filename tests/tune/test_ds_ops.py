"""The DeepSpeed op build folder: a lock left by a killed builder is cleared, a held one is not; builds always run
this environment's ninja."""

from __future__ import annotations

import os
import subprocess
import sys

from tune.ds_ops import clear_stale_build_locks


def test_a_lock_no_process_holds_is_removed_and_a_held_one_kept(tmp_path):
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()  # what a builder killed mid-build leaves: the file, with nobody holding it
    held = tmp_path / "other_op" / "lock"
    held.parent.mkdir()
    # A live builder: another process that created the lock as torch's FileBaton does and keeps it open.
    builder = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({str(held)!r}, os.O_CREAT | os.O_EXCL); "
                                "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        assert clear_stale_build_locks(tmp_path) == [stale]
        assert not stale.exists() and held.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_build_locks(tmp_path) == [held]  # its builder is gone: now it is stale too
    assert clear_stale_build_locks(tmp_path) == []


def test_use_prebuilt_ops_clears_the_named_folder(tmp_path, monkeypatch, capsys):
    from tune.ds_ops import EXTENSIONS_ENV, use_prebuilt_ops

    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "lock").touch()
    monkeypatch.setenv(EXTENSIONS_ENV, str(tmp_path))
    assert use_prebuilt_ops() == str(tmp_path)
    assert not (tmp_path / "op" / "lock").exists()
    assert "stale build lock" in capsys.readouterr().err
    assert os.environ[EXTENSIONS_ENV] == str(tmp_path)


def _fake_ninja(folder):
    folder.mkdir()
    fake = folder / "ninja"
    fake.write_text("#!/bin/sh\necho 1.11.1\n")  # what Debian's ninja-build answers: another log format
    fake.chmod(0o755)
    return fake


def test_builds_run_this_environments_ninja_whatever_is_first_on_path(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from tune.ds_ops import EXTENSIONS_ENV, environment_ninja, use_prebuilt_ops

    ours = environment_ninja()
    assert ours is not None, "the ninja package (a DeepSpeed dependency) is not installed"
    fake = _fake_ninja(tmp_path / "system-bin")
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake.parent), "/usr/bin", "/bin"]))
    monkeypatch.setenv(EXTENSIONS_ENV, str(tmp_path / "ext"))
    assert Path(shutil.which("ninja")) == fake
    use_prebuilt_ops()
    assert Path(shutil.which("ninja")).resolve() == ours.resolve()
    assert str(fake.parent) in os.environ["PATH"].split(os.pathsep)  # the rest of PATH is kept, only shadowed


def test_a_path_already_finding_this_environments_ninja_is_left_as_it_is(tmp_path, monkeypatch):
    from tune.ds_ops import EXTENSIONS_ENV, environment_ninja, pin_ninja

    path = os.pathsep.join([str(environment_ninja().parent), str(_fake_ninja(tmp_path / "system-bin").parent)])
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv(EXTENSIONS_ENV, str(tmp_path / "ext"))
    assert pin_ninja() == environment_ninja()
    assert os.environ["PATH"] == path
