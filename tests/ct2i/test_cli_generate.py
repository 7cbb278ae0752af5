"""`ct2i generate` and `ct2i eval` through a minimal argparse main built from `add_generation_commands`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.spec import load_spec
from causalt2i.trainer import train
from ct2i.cli_generate import EXIT_BAD_INPUT, EXIT_OK, add_generation_commands

FAST = ["--steps", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU the thread pool's spinning costs ~6x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ct2i(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ct2i")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generation_commands(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny adapter on {<s1> cat, <v1> dog}; train() leaves its spec.json one folder above it."""
    root = tmp_path_factory.mktemp("cli-adapter")
    spec_path = write_synthetic_spec(root / "spec", name="cli", steps=2)
    data = yaml.safe_load(spec_path.read_text())
    data["train"]["lr"] = 1e-3
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return train(load_spec(spec_path), root / "run").adapter_dir


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_writes_one_png_and_is_deterministic(adapter_dir, tmp_path, capsys):
    args = ["generate", "--adapter", str(adapter_dir), "--prompt", "a <s1> cat and a <v1> dog", *FAST, "--seed", "3"]
    assert ct2i([*args, "--out", str(tmp_path / "a.png")]) == EXIT_OK
    assert ct2i([*args, "--out", str(tmp_path / "b.png")]) == EXIT_OK
    first = _pixels(tmp_path / "a.png")
    assert first.shape == (64, 64, 3), "the tiny base's native size"
    assert np.array_equal(first, _pixels(tmp_path / "b.png"))
    assert str(tmp_path / "a.png") in capsys.readouterr().out


def test_generate_n_writes_numbered_files_matching_single_seeds(adapter_dir, tmp_path):
    common = ["generate", "--adapter", str(adapter_dir), "--prompt", "a <s1> cat", *FAST, "--width", "48", "--height", "32"]
    assert ct2i([*common, "--n", "2", "--seed", "10", "--out", str(tmp_path / "out.png")]) == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]
    assert ct2i([*common, "--seed", "11", "--out", str(tmp_path / "single.png")]) == EXIT_OK
    second = _pixels(tmp_path / "out-1.png")
    assert second.shape == (32, 48, 3)
    # Image 1 of a batch seeded 10 uses seed 11; batched kernels may differ by one uint8 level.
    assert np.abs(second.astype(int) - _pixels(tmp_path / "single.png").astype(int)).max() <= 1


def test_generate_shows_a_progress_bar_on_a_tty(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert ct2i(["generate", "--adapter", str(adapter_dir), "--prompt", "a <s1> cat", "--steps", "3", "--out", str(tmp_path / "x.png")]) == EXIT_OK
    assert "3/3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def foreign_adapter_dir(adapter_dir, tmp_path_factory):
    """The same adapter, its manifest claiming another base (the fingerprint is not part of the tensor hash)."""
    copy = tmp_path_factory.mktemp("foreign") / "adapter"
    shutil.copytree(adapter_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["base_fingerprint"] = "f" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


LONG = "a <s1> cat" + " and a dog" * 30

GENERATE_BAD = [
    pytest.param(["--prompt", "a <q1> toy"], "prompt", id="unknown-token"),
    pytest.param(["--prompt", LONG], "prompt", id="over-77-tokens"),
    pytest.param(["--steps", "0"], "steps", id="steps-0"),
    pytest.param(["--steps", "201"], "steps", id="steps-201"),
    pytest.param(["--guidance", "-1"], "guidance", id="guidance-negative"),
    pytest.param(["--guidance", "30.1"], "guidance", id="guidance-30.1"),
    pytest.param(["--width", "50"], "width", id="width-not-multiple-of-8"),
    pytest.param(["--height", "512"], "height", id="height-out-of-tiny-range"),
    pytest.param(["--width", "16"], "width", id="width-below-range"),
    pytest.param(["--n", "0"], "n", id="n-0"),
    pytest.param(["--n", "17"], "n", id="n-17"),
    pytest.param(["--adapter", "FOREIGN"], "adapter", id="other-base-fingerprint"),
    pytest.param(["--adapter", "MISSING"], "adapter", id="adapter-folder-missing"),
    pytest.param(["--out", "OUT.jpg"], "out", id="out-not-png"),
]


@pytest.mark.parametrize(("override", "field"), GENERATE_BAD)
def test_generate_bad_input_is_one_line_naming_the_field_and_exit_2(adapter_dir, foreign_adapter_dir, tmp_path, capsys, override, field):
    values = {"--adapter": str(adapter_dir), "--prompt": "a <s1> cat", "--steps": "2", "--out": str(tmp_path / "out.png")}
    substitutes = {"FOREIGN": str(foreign_adapter_dir), "MISSING": str(tmp_path / "nope"), "OUT.jpg": str(tmp_path / "out.jpg")}
    for flag, value in zip(override[::2], override[1::2]):
        values[flag] = substitutes.get(value, value)
    argv = ["generate"] + [item for pair in values.items() for item in pair]
    assert ct2i(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"ct2i generate: {field}: "), err
    assert list(tmp_path.iterdir()) == []


def test_eval_writes_metrics_for_each_subject_and_a_report(adapter_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = ct2i(["eval", "--adapter", str(adapter_dir), *FAST, "--seeds", "0,1", "--max-prompts", "1", "--out", str(out)])
    assert code == EXIT_OK
    metrics = json.loads((out / "metrics.json").read_text())
    for token in ("<s1>", "<v1>"):
        subject = metrics["subjects"][token]
        assert all(isinstance(subject[name], float) for name in ("clip_i", "clip_t", "lpips", "kid")), subject
    assert metrics["prompts"][0]["prompt"] == "a photo of a <s1> cat and a <v1> dog"
    with Image.open(out / "report.png") as report:
        report.load()
        assert report.width >= 10 * 64 and report.height >= 64
    assert "CLIP-I" in capsys.readouterr().out


def test_eval_takes_prompts_from_a_file_and_references_from_a_spec(adapter_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one subject alone, then both\na <v1> dog in the snow\n\n{subjects} on the beach\n")
    spec_yaml = adapter_dir.parent.parent / "spec" / "spec.yaml"
    out = tmp_path / "eval"
    code = ct2i(["eval", "--adapter", str(adapter_dir), *FAST, "--seeds", "0,1", "--prompts", str(prompts), "--references", str(spec_yaml), "--out", str(out)])
    assert code == EXIT_OK
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["prompt"] for row in metrics["prompts"]] == ["a <v1> dog in the snow", "a <s1> cat and a <v1> dog on the beach"]
    assert (metrics["subjects"]["<s1>"]["num_images"], metrics["subjects"]["<v1>"]["num_images"]) == (2, 4)


EVAL_BAD = [
    pytest.param(["--seeds", "a,b"], "seeds", id="seeds-not-integers"),
    pytest.param(["--seeds", "1,2,1"], "seeds", id="seeds-repeated"),
    pytest.param(["--steps", "0"], "steps", id="steps-0"),
    pytest.param(["--width", "60"], "width", id="width-not-multiple-of-8"),
    pytest.param(["--references", "NOWHERE"], "references", id="references-missing"),
    pytest.param(["--metrics-config", "BADCONFIG"], "metrics_config.inceptoin", id="metrics-config-unknown-key"),
    pytest.param(["--prompts", "UNKNOWN_TOKEN"], "prompts.0", id="prompt-unknown-token"),
    pytest.param(["--prompts", "ONE_SUBJECT"], "prompts", id="a-subject-named-by-no-prompt"),
]


@pytest.mark.parametrize(("override", "field"), EVAL_BAD)
def test_eval_bad_input_is_one_line_naming_the_field_and_exit_2(adapter_dir, tmp_path, capsys, override, field):
    (tmp_path / "bad.yaml").write_text("inceptoin: tiny\n")
    (tmp_path / "prompts.txt").write_text("a <q1> toy\n")
    (tmp_path / "one.txt").write_text("a <v1> dog\n")
    substitutes = {"ONE_SUBJECT": str(tmp_path / "one.txt"), "NOWHERE": str(tmp_path / "nowhere"), "BADCONFIG": str(tmp_path / "bad.yaml"), "UNKNOWN_TOKEN": str(tmp_path / "prompts.txt")}
    argv = ["eval", "--adapter", str(adapter_dir), *FAST, "--seeds", "0", "--out", str(tmp_path / "eval")]
    argv += [substitutes.get(item, item) for item in override]
    assert ct2i(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ct2i eval: {field}: "), err
    assert not (tmp_path / "eval").exists()


def test_eval_without_references_beside_the_adapter_asks_for_them(adapter_dir, tmp_path, capsys):
    lone = tmp_path / "lone" / "adapter"
    shutil.copytree(adapter_dir, lone)
    assert ct2i(["eval", "--adapter", str(lone), *FAST, "--seeds", "0"]) == EXIT_BAD_INPUT
    assert "ct2i eval: references: " in capsys.readouterr().err
