"""Exports checked by their real consumers: diffusers' `StableDiffusionXLPipeline`, `load_lora_weights`,
`load_textual_inversion`, its kohya converter, and peft's state dict of what diffusers loaded.

"Same image" is against `ct2i generate` (the CLI, or the `Generator` it runs) with the same prompt, seed,
steps, guidance and size. Tolerances: bitwise when the pipeline's U-Net holds the merged weights (peft's
`fuse_lora` computes W + scale·(B @ A) exactly as `AdapterHost` does); with the LoRA unfused, peft adds
scale·(x A)B to x W, a different order of float sums, so pixels may differ by one level of 255.
"""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from causalt2i.adapter import load_adapter
from causalt2i.export import (
    DIFFUSERS_LORA_FILE,
    EMBEDDINGS_DIR,
    README_FILE,
    ExportError,
    embedding_stem,
    fusable,
    kohya_name,
    write_export,
    write_zip,
)
from causalt2i.generation import Generator
from causalt2i.models import load_sdxl
from causalt2i.spec import join_subject_phrases

STEPS = 4
GUIDANCE = 7.5
UNFUSED_LEVELS = 1  # max |Δ| in levels of 255 with the LoRA unfused (see the module docstring)


def tiny_pipeline() -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline assembled from the tiny parts, sampling as ct2i does (DPM-Solver++)."""
    parts = load_sdxl("tiny")
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.noise_scheduler, add_watermarker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_embeddings(pipe, export_dir, tokens) -> None:
    for token in tokens:
        rows = load_file(export_dir / EMBEDDINGS_DIR / f"{embedding_stem(token)}.safetensors")
        pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    # Pool at the real EOS: the tiny configs carry SDXL's legacy `eos_token_id: 2`, as a plain pipeline would (docs/clients.md).
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        encoder.config.eos_token_id = tokenizer.eos_token_id
        getattr(encoder, "text_model", encoder).eos_token_id = tokenizer.eos_token_id


def pipeline_pixels(pipe, prompt: str, seed: int = 0) -> torch.Tensor:
    images = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil").images
    return torch.from_numpy(np.array(images[0])).permute(2, 0, 1).unsqueeze(0)


def joint_prompt(adapter) -> str:
    return join_subject_phrases([f"a {s.token} {s.class_word}" for s in adapter.manifest.subjects])


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(load_sdxl("tiny"))


def ct2i_pixels(generator, adapter, prompt: str, seed: int = 0) -> torch.Tensor:
    generator.use(adapter)
    return generator({"prompt": prompt, "steps": STEPS, "guidance": GUIDANCE, "seed": seed}).pixels


@pytest.fixture(scope="module", params=["lora", "compressed"])
def lora_form(request, lora_adapter_dir, compressed_dir):
    """Each LoRA-form adapter: a LoRA tune, and a full tune compressed to LoRA (per-module ranks, bias changes)."""
    return load_adapter(lora_adapter_dir if request.param == "lora" else compressed_dir)


def test_readme_snippet_reproduces_ct2i_generate(lora_form, tmp_path, monkeypatch):
    """Bitwise for the LoRA tune (fused); within one level for the compressed tune, whose bias changes peft cannot fuse."""
    from ct2i.cli import main

    export_dir = tmp_path / "export"
    write_export(lora_form, "diffusers", export_dir)
    readme = (export_dir / README_FILE).read_text()
    for token in lora_form.manifest.tokens:
        assert f"`{token}`" in readme
    assert lora_form.manifest.base_fingerprint in readme and f"`{joint_prompt(lora_form)}`" in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1).replace("'EXPORT_DIR'", repr(str(export_dir)))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    theirs = np.asarray(Image.open(tmp_path / "image.png"))
    assert main(["generate", "--adapter", str(lora_form.path), "--prompt", joint_prompt(lora_form), "--seed", "0", "--out", str(tmp_path / "ct2i.png")]) == 0
    ours = np.asarray(Image.open(tmp_path / "ct2i.png"))
    if fusable(lora_form, "diffusers"):
        assert "pipe.fuse_lora()" in snippet and "bitwise" in readme
        assert np.array_equal(theirs, ours)
    else:
        assert lora_form.manifest.compressed_from is not None and "pipe.fuse_lora()" not in snippet
        assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= UNFUSED_LEVELS


def test_load_lora_weights_and_both_textual_inversions_match_ct2i(lora_form, generator, tmp_path):
    export_dir = tmp_path / "export"
    write_export(lora_form, "diffusers", export_dir)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(export_dir))  # finds pytorch_lora_weights.safetensors beside the embeddings
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    factors = lora_form.lora_factors()
    with_bias = any(f.bias is not None for f in factors.values())
    expected = {f"{m}.lora_{ab}.weight" for m in factors for ab in "AB"} | ({f"{m}.lora_B.bias" for m in factors} if with_bias else set())
    assert set(loaded) == expected, "diffusers left out or added LoRA tensors"
    for module, f in factors.items():
        layer = pipe.unet.get_submodule(module)
        assert layer.scaling["default_0"] == f.scale, module
        assert torch.equal(layer.lora_B["default_0"].weight, f.up) and torch.equal(layer.lora_A["default_0"].weight, f.down), module
        if f.bias is not None:
            assert torch.equal(layer.lora_B["default_0"].bias, f.bias), module
    load_embeddings(pipe, export_dir, lora_form.manifest.tokens)
    prompt = joint_prompt(lora_form)
    ours = ct2i_pixels(generator, lora_form, prompt)
    generator.use(None)
    base = generator({"prompt": "a cat and a dog", "steps": STEPS, "guidance": GUIDANCE, "seed": 0}).pixels
    assert (ours.int() - base.int()).abs().max() > 10, "the adapter changes the image too little for this test to mean anything"
    unfused = pipeline_pixels(pipe, prompt)
    assert (unfused.int() - ours.int()).abs().max() <= UNFUSED_LEVELS
    if not with_bias:
        pipe.fuse_lora()
        assert torch.equal(pipeline_pixels(pipe, prompt), ours)


def test_kohya_export_is_consumed_whole_by_diffusers_converter_and_matches(lora_adapter_dir, generator, tmp_path):
    adapter = load_adapter(lora_adapter_dir)
    export_dir = tmp_path / "kohya"
    export = write_export(adapter, "kohya", export_dir)
    lora_file = f"{adapter.manifest.name}.safetensors"
    assert export.notes == []
    raw = load_file(export_dir / lora_file)
    factors = adapter.lora_factors()
    names = {kohya_name(m, layers_per_block=1) for m in factors}
    assert set(raw) == {f"{n}.{suffix}" for n in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_")) for n in names)

    pipe = tiny_pipeline()
    # diffusers' own kohya path: SGM block names mapped from the U-Net config, then the kohya converter,
    # which raises on any key it does not rename.
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(str(export_dir), weight_name=lora_file, unet_config=pipe.unet.config)
    assert len(converted) == 2 * len(factors) and len(alphas) == len(factors)
    pipe.load_lora_weights(str(export_dir), weight_name=lora_file)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert set(loaded) == {f"{m}.lora_{ab}.weight" for m in factors for ab in "AB"}, "a module is missing or extra after the kohya round trip"
    for module, f in factors.items():
        layer = pipe.unet.get_submodule(module)
        assert layer.scaling["default_0"] == f.scale
        assert torch.equal(layer.lora_A["default_0"].weight, f.down) and torch.equal(layer.lora_B["default_0"].weight, f.up)
    load_embeddings(pipe, export_dir, adapter.manifest.tokens)
    prompt = joint_prompt(adapter)
    ours = ct2i_pixels(generator, adapter, prompt)
    assert (pipeline_pixels(pipe, prompt).int() - ours.int()).abs().max() <= UNFUSED_LEVELS
    pipe.fuse_lora()
    assert torch.equal(pipeline_pixels(pipe, prompt), ours)


def test_kohya_export_of_per_module_ranks_keeps_each_module_update(compressed_dir, tmp_path):
    """Ranks differ per module: one alpha for the file, the scale ratio folded into lora_up (see kohya_lora_tensors)."""
    adapter = load_adapter(compressed_dir)
    factors = adapter.lora_factors()
    assert len({f.rank for f in factors.values()}) > 1, "the compressed fixture should have per-module ranks"
    export = write_export(adapter, "kohya", tmp_path / "kohya")
    assert any("bias" in note for note in export.notes) and "no bias term" in export.files[README_FILE].decode()
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "kohya"), weight_name=f"{adapter.manifest.name}.safetensors")
    for module, f in factors.items():
        loaded = pipe.unet.get_submodule(module).get_delta_weight("default_0")
        torch.testing.assert_close(loaded, f.delta_weight(), rtol=1e-6, atol=1e-7)


def test_embeddings_alone_into_a_pipeline_with_the_lora_fused(lora_adapter_dir, generator, tmp_path):
    adapter = load_adapter(lora_adapter_dir)
    write_export(adapter, "diffusers", tmp_path / "diffusers")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the U-Net keeps the fused weights and no longer has LoRA layers
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    export = write_export(adapter, "embeddings", tmp_path / "embeddings")
    assert sorted(export.files) == [README_FILE] + [f"{EMBEDDINGS_DIR}/{embedding_stem(t)}.safetensors" for t in adapter.manifest.tokens]
    for index, token in enumerate(adapter.manifest.tokens):
        with safe_open(tmp_path / "embeddings" / EMBEDDINGS_DIR / f"{embedding_stem(token)}.safetensors", "pt") as rows:
            assert rows.metadata()["token"] == token
            assert rows.get_tensor("clip_l").shape == (1, pipe.text_encoder.config.hidden_size)
            assert rows.get_tensor("clip_g").shape == (1, pipe.text_encoder_2.config.hidden_size)
            assert torch.equal(rows.get_tensor("clip_g")[0], adapter.tensors["text_encoder_2.token_embeddings"][index])
    load_embeddings(pipe, tmp_path / "embeddings", adapter.manifest.tokens)
    prompt = joint_prompt(adapter)
    assert torch.equal(pipeline_pixels(pipe, prompt, seed=3), ct2i_pixels(generator, adapter, prompt, seed=3))


def test_a_full_adapter_exports_embeddings_but_its_lora_only_through_compression(full_tune_500, tmp_path):
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(ExportError, match="compress") as err:
            write_export(full_tune_500.adapter_dir, fmt, tmp_path / fmt)
        assert err.value.field == "adapter" and not (tmp_path / fmt).exists()
    write_export(full_tune_500.adapter_dir, "embeddings", tmp_path / "embeddings")


def test_refusals_leave_nothing_behind(lora_adapter_dir, tmp_path):
    with pytest.raises(ExportError) as err:
        write_export(lora_adapter_dir, "safetensors", tmp_path / "out")
    assert err.value.field == "format" and not (tmp_path / "out").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as err:
        write_export(lora_adapter_dir, "diffusers", occupied)
    assert err.value.field == "out" and sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"], "a staging folder was left behind"


def test_the_zip_stream_holds_the_export_files(lora_adapter_dir, tmp_path):
    export = write_export(lora_adapter_dir, "kohya", tmp_path / "kohya")
    buffer = io.BytesIO()
    write_zip(export, buffer)
    with zipfile.ZipFile(buffer) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == export.files
    on_disk = {p.relative_to(tmp_path / "kohya").as_posix(): p.read_bytes() for p in (tmp_path / "kohya").rglob("*") if p.is_file()}
    assert on_disk == export.files
    assert DIFFUSERS_LORA_FILE not in export.files
