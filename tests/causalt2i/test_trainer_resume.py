"""Exact resume: N steps straight equal k steps, a stop, a resume and N − k more."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from causalt2i.checkpoint import latest_checkpoint, load_checkpoint
from causalt2i.trainer import train

STEPS = 10


@pytest.fixture(scope="module")
def resume_spec_path(synthetic_spec_path, tmp_path_factory) -> Path:
    data = yaml.safe_load(synthetic_spec_path.read_text())
    data["train"].update(steps=STEPS, checkpoint_every=4)
    for subject in data["subjects"]:
        subject["images"] = [str(synthetic_spec_path.parent / p) for p in subject["images"]]
    path = tmp_path_factory.mktemp("resume") / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def straight_run(resume_spec_path, tmp_path_factory):
    from causalt2i.spec import load_spec

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(load_spec(resume_spec_path), out)
    assert result.step == STEPS and result.adapter_dir is not None
    state, _ = load_checkpoint(latest_checkpoint(out))
    return state


def _ct2i(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ct2i.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _assert_same_run(resumed_dir: Path, straight: dict) -> None:
    state, _ = load_checkpoint(latest_checkpoint(resumed_dir))
    assert state["step"] == STEPS
    assert set(state["trainable"]) == set(straight["trainable"])
    for name, tensor in straight["trainable"].items():
        assert torch.allclose(state["trainable"][name], tensor, rtol=0, atol=1e-6), name
    assert len(state["losses"]) == STEPS
    assert torch.allclose(torch.tensor(state["losses"]), torch.tensor(straight["losses"]), rtol=1e-6, atol=0)


def test_resume_after_max_steps_equals_a_straight_run(resume_spec_path, straight_run, tmp_path):
    out = tmp_path / "run"
    first = _ct2i("train", str(resume_spec_path), "--out", str(out), "--max-steps", "3")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 3, err
    assert load_checkpoint(latest_checkpoint(out))[0]["step"] == 3
    assert "--resume" in err
    second = _ct2i("train", str(resume_spec_path), "--out", str(out), "--resume")
    stdout, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert Path(stdout.strip().splitlines()[-1]) == out / "adapter"
    _assert_same_run(out, straight_run)


def test_resume_after_sigterm_equals_a_straight_run(resume_spec_path, straight_run, tmp_path):
    out = tmp_path / "run"
    process = _ct2i("train", str(resume_spec_path), "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    stopped_at = load_checkpoint(latest_checkpoint(out))[0]["step"]
    assert 2 <= stopped_at < STEPS
    assert not (out / "adapter").exists()
    resumed = _ct2i("train", str(resume_spec_path), "--out", str(out), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_same_run(out, straight_run)
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, STEPS + 1)), "a step was counted twice or skipped across the resume"


def test_an_existing_run_is_not_overwritten_without_resume(resume_spec_path, tmp_path, capsys):
    from ct2i.cli import main

    out = tmp_path / "run"
    assert main(["train", str(resume_spec_path), "--out", str(out), "--max-steps", "1"]) == 3
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(["train", str(resume_spec_path), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
