"""The trainer on the faithful tiny preset: dtype policy, prediction type, alpha: auto, host syncs, manifest, diagnostics."""

import io
import statistics

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from causalt2i.adapter import read_manifest
from causalt2i.adapter_format import tensor_group
from causalt2i.callbacks import ProgressCallback
from causalt2i.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from causalt2i.models import load_sdxl
from causalt2i.spec import SpecError
from causalt2i.trainer import Trainer, train
from causalt2i.vision import MAP_PAD_VALUE


# --- dtype policy -----------------------------------------------------------------------------------------


def test_bf16_policy_holds_frozen_modules_in_bf16_and_trainable_tensors_in_fp32(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=2, dtype_policy="bf16"), tmp_path / "run")
    parts = trainer.model.parts
    trainable = {id(t) for t in trainer.model.named_trainable().values()}
    assert len(trainable) > 0
    for module in (parts.unet, parts.text_encoder, parts.text_encoder_2):
        for name, param in module.named_parameters():
            expected = torch.float32 if id(param) in trainable else torch.bfloat16
            assert param.dtype == expected, f"{name}: {param.dtype}"
            assert param.requires_grad == (id(param) in trainable), name
    assert all(t.dtype == torch.float32 for t in trainer.model.named_trainable().values())
    assert all(p.dtype == torch.bfloat16 for p in parts.image_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in parts.vae.parameters()), "SDXL's VAE (force_upcast) stays fp32"
    before = {k: v.detach().clone() for k, v in trainer.model.named_trainable().items()}
    terms = dict(trainer.train_step())
    assert all(v == v and abs(v) != float("inf") for v in terms.values()), terms
    moved = [k for k, v in trainer.model.named_trainable().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("unet.") for k in moved) and "text_encoder.token_rows" in moved


def test_fp32_policy_holds_everything_in_fp32(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=2, dtype_policy="fp32"), tmp_path / "run")
    for module in trainer.model.parts.modules().values():
        assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.fixture(scope="module")
def fp16_fix_vae_dir(tmp_path_factory):
    """The tiny VAE saved with `force_upcast: false`, as madebyollin/sdxl-vae-fp16-fix is SDXL's."""
    vae = load_sdxl("tiny").vae
    vae.register_to_config(force_upcast=False)
    folder = tmp_path_factory.mktemp("vae-fp16-fix")
    vae.save_pretrained(folder)
    return folder


def test_the_fp16_fix_vae_chosen_in_the_spec_is_held_in_bf16(synthetic_spec_path, fp16_fix_vae_dir, tmp_path):
    import yaml

    from causalt2i.spec import parse_spec

    data = yaml.safe_load(synthetic_spec_path.read_text())
    data["vae"] = str(fp16_fix_vae_dir)
    data["train"].update(steps=2, dtype_policy="bf16")
    trainer = Trainer(parse_spec(data, base_dir=synthetic_spec_path.parent), tmp_path / "run")
    assert trainer.model.parts.vae.config.force_upcast is False
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parts.vae.parameters())
    assert all(torch.isfinite(example.latents).all() for example in trainer.examples)


# --- prediction type --------------------------------------------------------------------------------------


def _parts_predicting(kind: str):
    parts = load_sdxl("tiny")
    parts.noise_scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type=kind)
    return parts


def test_a_v_prediction_base_trains_against_the_velocity(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=2), tmp_path / "run", parts=_parts_predicting("v_prediction"))
    model = trainer.model
    example = trainer.examples[0]
    noise = torch.randn(example.latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700])
    outputs = []
    hook = model.parts.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out.sample.detach()))
    terms = model.loss(example, noise, timesteps, alpha=0.0)
    hook.remove()
    velocity = model.parts.noise_scheduler.get_velocity(example.latents, noise, timesteps)
    assert not torch.allclose(velocity, noise, atol=1e-2)
    assert torch.equal(terms.cdm, torch.nn.functional.mse_loss(outputs[0].float(), velocity.float()))
    assert terms.cdm != torch.nn.functional.mse_loss(outputs[0].float(), noise)


def test_a_base_predicting_something_else_is_refused_naming_base_model(make_spec, tmp_path):
    with pytest.raises(SpecError) as refused:
        Trainer(make_spec(steps=2), tmp_path / "run", parts=_parts_predicting("sample"))
    assert refused.value.field == "base_model" and "sample" in str(refused.value)


# --- alpha: auto ------------------------------------------------------------------------------------------

AUTO = dict(steps=8, alpha_warmup=4, checkpoint_every=2, log_every=2)


@pytest.fixture(scope="module")
def straight_auto_run(synthetic_spec_path, tmp_path_factory):
    import yaml

    from causalt2i.spec import parse_spec

    torch.set_num_threads(1)
    data = yaml.safe_load(synthetic_spec_path.read_text())
    data["train"].update(AUTO)
    spec = parse_spec(data, base_dir=synthetic_spec_path.parent)
    out = tmp_path_factory.mktemp("auto") / "run"
    result = train(spec, out)
    return spec, out, result


def test_alpha_is_stored_in_checkpoints_their_meta_and_the_manifest(straight_auto_run):
    _, out, _ = straight_auto_run
    state, meta = load_checkpoint(latest_checkpoint(out))
    alpha = state["alpha"]["value"]
    assert alpha is not None and alpha > 0 and meta["alpha"] == alpha
    history = [load_checkpoint(path) for path in list_checkpoints(out)]
    assert all(m["diagnostics"]["alpha"] == alpha for _, m in history)
    manifest = read_manifest(out / "adapter")
    assert manifest.alpha == alpha and manifest.training["alpha"] == "auto"
    assert manifest.training["world_size"] == 1  # one process trained it


def test_alpha_is_reported_every_step_and_is_zero_until_the_warm_up_ends(make_spec, tmp_path):
    trainer = Trainer(make_spec(**AUTO), tmp_path / "run")
    seen = []
    trainer.callbacks.append(type("Record", (), {"on_step": lambda self, info: seen.append(info)})())
    trainer.fit()
    assert [info.step for info in seen] == list(range(1, 9))
    assert [info.terms["alpha"] for info in seen[:4]] == [0.0] * 4
    assert all(info.terms["alpha"] == trainer.alpha.value > 0 for info in seen[4:])
    assert all(info.terms["cst"] == 0.0 for info in seen[:4]) and all(info.terms["cst"] > 0 for info in seen[4:])
    # alpha = median(L_cdm) / median(ratio) over the warm-up steps
    cdm = statistics.median(info.terms["cdm"] for info in seen[:4])
    ratio = statistics.median(info.terms["cst_ratio"] for info in seen[:4])
    assert trainer.alpha.value == pytest.approx(cdm / ratio, rel=1e-6)


def test_alpha_scale_multiplies_the_calibrated_alpha_exactly():
    """The search's α axis under `alpha: auto`: the same warm-up records with scale 3 give exactly 3x the α."""
    from causalt2i.trainer import AlphaCalibration

    records = [(torch.tensor(0.5 + step / 10), torch.tensor(2.0 + step)) for step in range(1, 5)]
    plain, scaled = AlphaCalibration("auto", 4), AlphaCalibration("auto", 4, scale=3.0)
    for step, (cdm, ratio) in enumerate(records, start=1):
        plain.record(step, cdm, ratio)
        scaled.record(step, cdm, ratio)
    assert plain.value == statistics.median(r[0].item() for r in records) / statistics.median(r[1].item() for r in records)
    assert scaled.value == 3.0 * plain.value and scaled.alpha_for(5) == 3.0 * plain.alpha_for(5)
    assert scaled.alpha_for(4) == 0.0  # still nothing during the warm-up


@pytest.mark.parametrize("stop_at", [3, 6], ids=["inside-the-warm-up", "after-it"])
def test_alpha_auto_resumes_exactly_across_the_warm_up_boundary(straight_auto_run, tmp_path, stop_at):
    spec, straight_out, _ = straight_auto_run
    out = tmp_path / "run"
    first = train(spec, out, max_steps=stop_at)
    assert first.stopped_early and first.step == stop_at
    resumed = train(spec, out, resume=True)
    assert resumed.resumed_from == stop_at and resumed.step == 8
    straight, _ = load_checkpoint(latest_checkpoint(straight_out))
    state, _ = load_checkpoint(latest_checkpoint(out))
    assert state["alpha"]["value"] == straight["alpha"]["value"]
    assert state["losses"] == straight["losses"]
    for name, tensor in straight["trainable"].items():
        assert torch.equal(state["trainable"][name], tensor), name


# --- host syncs -------------------------------------------------------------------------------------------


def test_steps_queue_their_terms_and_tokenize_nothing(make_spec, tmp_path, monkeypatch):
    trainer = Trainer(make_spec(steps=6), tmp_path / "run")
    assert trainer.noise_generator.device == trainer.device
    calls = []
    for tokenizer in (trainer.model.parts.tokenizer, trainer.model.parts.tokenizer_2):
        monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or pytest.fail("tokenized during a step"))
    for _ in range(3):
        trainer.train_step()
    assert calls == []
    assert len(trainer._pending) == 3, "a step brought its loss to the host"
    assert len(trainer.losses) == 3 and trainer._pending == []


def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_holds_it(make_spec, tmp_path):
    trainer = Trainer(make_spec(steps=6, checkpoint_every=4, log_every=4), tmp_path / "run")
    trainer.train_step()
    with torch.no_grad():
        trainer.model.sacd.mask_logits.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run") is None


# --- what a run leaves ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_manifest_states_every_tensors_true_dtype(make_spec, tmp_path, mode):
    trainer = Trainer(make_spec(steps=1, param_mode=mode, lora_rank=4, alpha=0.002), tmp_path / "run")
    trainer.train_step()
    folder = trainer.export_adapter()
    manifest = read_manifest(folder)
    expected = {"full": {"attn2": "float16"}, "lora": {"lora": "float32"}}[mode]  # full: ΔW in fp16 (METHOD.md)
    assert manifest.tensor_dtypes == {**expected, "text_encoder.token_embeddings": "float32", "text_encoder_2.token_embeddings": "float32"}
    assert manifest.dtype == next(iter(expected.values()))
    assert manifest.alpha == 0.002
    with safe_open(str(folder / "adapter.safetensors"), "pt") as handle:
        for name in handle.keys():
            assert str(handle.get_tensor(name).dtype).removeprefix("torch.") == manifest.tensor_dtypes[tensor_group(name)], name


def test_diagnostics_are_printed_and_stored_every_checkpoint(make_spec, tmp_path):
    stream = io.StringIO()
    trainer = Trainer(make_spec(steps=4, checkpoint_every=2), tmp_path / "run", callbacks=[ProgressCallback(4, stream=stream)])
    trainer.fit()
    metas = [load_checkpoint(path)[1] for path in list_checkpoints(tmp_path / "run")]
    assert [m["step"] for m in metas] == [2, 4]
    for meta in metas:
        diagnostics = meta["diagnostics"]
        assert len(diagnostics["cos_kept"]) == len(diagnostics["cos_removed"]) == len(diagnostics["cos_margin"]) == 2
        assert set(diagnostics["mask_grad_share"]) == {"cdm", "attn", "cst"}
        assert sum(diagnostics["mask_grad_share"].values()) == pytest.approx(1.0, abs=1e-4)
        assert set(diagnostics["probe_terms"]) == {"cdm", "attn", "cst", "cst_ratio"}
        assert len(diagnostics["attn_in_tile"]) == 2
    printed = [line for line in stream.getvalue().splitlines() if line.startswith("diagnostics step")]
    assert len(printed) == 2 and "mask_grad_share.cst=" in printed[0] and "cos_margin=" in printed[0]


def test_attention_maps_are_padded_with_zero_before_e_i(make_spec, tmp_path, monkeypatch):
    import causalt2i.vision as vision

    trainer = Trainer(make_spec(steps=1), tmp_path / "run")
    example = trainer.examples[0]
    assert example.latents.shape[-2] != example.latents.shape[-1], "a square canvas needs no padding and proves nothing"
    calls = []
    original = vision.clip_preprocess
    monkeypatch.setattr(vision, "clip_preprocess", lambda images, size, pad_value=vision.IMAGE_PAD_VALUE: calls.append((images.detach(), pad_value)) or original(images, size, pad_value))
    trainer.model.loss(example, torch.zeros_like(example.latents), torch.tensor([500]), alpha=0.0)
    (maps, pad_value), = calls  # the one E_I call of a step: Atten_i on the identity maps
    assert maps.shape[0] == 2 and maps.shape[-2] != maps.shape[-1]
    assert pad_value == MAP_PAD_VALUE == 0.0


def test_clip_preprocess_pads_with_the_value_given():
    from causalt2i.models import CLIP_MEAN, CLIP_STD
    from causalt2i.vision import clip_preprocess

    wide = torch.ones(1, 3, 4, 8)
    out = clip_preprocess(wide, 8, pad_value=0.0)  # 8 x 8 after padding: no resize
    zero = torch.tensor([(0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    one = torch.tensor([(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    assert torch.allclose(out[0, :, :2], zero.expand(3, 2, 8), atol=1e-6) and torch.allclose(out[0, :, 6:], zero.expand(3, 2, 8), atol=1e-6)
    assert torch.allclose(out[0, :, 2:6], one.expand(3, 4, 8), atol=1e-6)
