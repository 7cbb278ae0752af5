"""`ct2i export` and `ct2i compress` through the real `ct2i` entry point: outputs, help, and bad input.

The adapters here are written by the real writer from seeded noise (a full ΔW adapter and a LoRA
adapter on the tiny base): the CLI's job is parsing and reporting; the formats' fidelity is tested
against diffusers in tests/causalt2i/test_export.py and test_compress.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, load_adapter, save_adapter
from causalt2i.export import FORMATS, README_FILE
from causalt2i.lora import attn2_projection_names
from causalt2i.models import attn2_state, load_sdxl
from ct2i.cli import main

SUBJECTS = [{"token": "<s1>", "class_word": "cat"}, {"token": "<v1>", "class_word": "dog"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write(out: Path, parts, attn2: dict, *, param_mode: str, fingerprint: str | None = None, **form) -> Path:
    generator = torch.Generator().manual_seed(7)
    rows = {key: torch.randn((len(SUBJECTS), enc.get_input_embeddings().weight.shape[1]), generator=generator)
            for key, enc in ((TE1_ROWS, parts.text_encoder), (TE2_ROWS, parts.text_encoder_2))}
    save_adapter(out, {**attn2, **rows}, {
        "base_model": "tiny", "base_fingerprint": fingerprint or parts.base_fingerprint(), "subjects": SUBJECTS,
        "param_mode": param_mode, "training": {}, "tenant": "acme", "name": f"{param_mode}-adapter", "step": 1, **form})
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-adapters")
    parts = load_sdxl("tiny")
    generator = torch.Generator().manual_seed(0)
    deltas = {k: (torch.randn(v.shape, generator=generator) * 0.02).half() for k, v in attn2_state(parts.unet).items()}
    lora = {}
    for module in attn2_projection_names(parts.unet):
        weight = parts.unet.get_submodule(module).weight
        lora[f"{module}.lora_A.weight"] = torch.randn((2, weight.shape[1]), generator=generator) * 0.1
        lora[f"{module}.lora_B.weight"] = torch.randn((weight.shape[0], 2), generator=generator) * 0.1
    full_form = {"attn2_storage": "delta", "dtype": "float16"}
    return {
        "full": _write(root / "full", parts, deltas, param_mode="full", **full_form),
        "foreign": _write(root / "foreign", parts, deltas, param_mode="full", fingerprint="0" * 64, **full_form),
        "lora": _write(root / "lora", parts, lora, param_mode="lora", lora_rank=2, lora_alpha=2.0, lora_scale=1.0, dtype="float32"),
    }


def test_help_explains_the_formats_and_the_compression(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(fmt in text for fmt in FORMATS) and "compress it first" in text and "README" in text
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    assert "--rank R" in text and "--energy E" in text and "Frobenius" in text and "PSNR" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "export" in text and "compress" in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_the_folder_and_prints_it(adapters, fmt, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(adapters["lora"]), "--format", fmt, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / README_FILE).is_file() and (out / "embeddings" / "s1.safetensors").is_file()


def test_compress_writes_a_lora_adapter_and_reports_its_fidelity(adapters, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", str(adapters["full"]), "--energy", "0.5", "--out", str(out), "--steps", "1", "--seeds", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "PSNR" in captured.err and "of the full adapter" in captured.err
    manifest = load_adapter(out).manifest
    assert manifest.param_mode == "lora" and manifest.compressed_from.energy == 0.5
    assert manifest.compressed_from.fidelity.seeds == [0] and manifest.compressed_from.fidelity.steps == 1
    assert main(["export", str(out), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0


BAD_INPUTS = [
    ("unknown format", ["export", "{lora}", "--format", "safetensors", "--out", "{out}"], "ct2i export: format: unknown format 'safetensors'"),
    ("full as LoRA", ["export", "{full}", "--format", "diffusers", "--out", "{out}"], "ct2i export: adapter: acme/full-adapter is a full-mode adapter; it exports as a LoRA only through compression"),
    ("no adapter", ["export", "{missing}", "--format", "kohya", "--out", "{out}"], "ct2i export: adapter: "),
    ("occupied out", ["export", "{lora}", "--format", "kohya", "--out", "{occupied}"], "ct2i export: out: "),
    ("compress LoRA", ["compress", "{lora}", "--rank", "2", "--out", "{out}"], "ct2i compress: adapter: "),
    ("no rank or energy", ["compress", "{full}", "--out", "{out}"], "ct2i compress: rank: give exactly one"),
    ("rank and energy", ["compress", "{full}", "--rank", "2", "--energy", "0.9", "--out", "{out}"], "ct2i compress: rank: give exactly one"),
    ("energy out of range", ["compress", "{full}", "--energy", "1.5", "--out", "{out}"], "ct2i compress: energy: "),
    ("bad seeds", ["compress", "{full}", "--energy", "0.9", "--seeds", "a,b", "--out", "{out}"], "ct2i compress: seeds: "),
    ("bad steps", ["compress", "{full}", "--energy", "0.9", "--steps", "0", "--out", "{out}"], "ct2i compress: steps: "),
    ("another base", ["compress", "{foreign}", "--energy", "0.9", "--out", "{out}"], "ct2i compress: base_model: "),
    ("unloadable base", ["compress", "{full}", "--energy", "0.9", "--base-model", "{missing}", "--out", "{out}"], "ct2i compress: base_model: "),
]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(adapters, case, argv, message, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep")
    names = {**{k: str(v) for k, v in adapters.items()}, "out": str(tmp_path / "out"), "missing": str(tmp_path / "missing"), "occupied": str(occupied)}
    assert main([arg.format(**names) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"] and [p.name for p in occupied.iterdir()] == ["mine.txt"]
