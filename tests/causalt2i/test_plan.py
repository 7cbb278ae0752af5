"""Real SDXL shapes on the meta device (no memory, no download): counts, watched layers, adapter sizes, memory plans.

The figures asserted exactly are those of `stabilityai/stable-diffusion-xl-base-1.0` and
`openai/clip-vit-large-patch14`; they also prove that the official configs kept in the repository are
the real ones.
"""

import pytest
import torch
from safetensors import safe_open

from causalt2i import plan
from causalt2i.lora import install_lora
from causalt2i.spec import parse_spec
from causalt2i.trainer import Trainer

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _spec(base_model: str = SDXL, *, resolution: int = 1024, gpus: float = 1.0, **train) -> object:
    subjects = [{"token": "<s1>", "class_word": "cat", "images": ["cat.png"]}, {"token": "<v1>", "class_word": "dog", "images": ["dog.png"]}]
    return parse_spec({"tenant": "acme", "name": "plan", "base_model": base_model, "subjects": subjects,
                       "train": {"resolution": resolution, **train}, "resources": {"gpus_per_worker": gpus}}, check_files=False)


@pytest.fixture(scope="module")
def sdxl() -> plan.Structure:
    return plan.structure(SDXL)


def test_real_sdxl_parameter_counts_are_exact(sdxl):
    assert sdxl.unet_params == 2_567_463_684
    assert sdxl.attn2_params == 545_670_400
    assert sdxl.attn2_kv_params == 340_787_200
    assert len(sdxl.attn2_layers) == 70
    assert (sdxl.text_encoder_params, sdxl.text_encoder_2_params) == (123_060_480, 694_659_840)
    assert sdxl.image_encoder_params == 303_966_208  # CLIP ViT-L/14 vision tower + its 1024→768 projection
    assert (sdxl.text_dim, sdxl.image_dim) == (2048, 768)


def test_the_lora_count_at_rank_16_is_what_install_lora_adds():
    parts = plan.shape_parts(SDXL)
    with torch.device("meta"):
        wrapped = install_lora(parts.unet, 16)
    added = sum(p.numel() for layer in wrapped.values() for name, p in layer.named_parameters() if ".lora_" in f".{name}")
    assert added == plan.structure(SDXL).lora_params(16) == 12_574_720


def test_the_recorder_watches_the_1280_wide_layers_at_1024_and_all_at_512(sdxl):
    at_1024 = plan.watched_layers(1024)
    assert len(at_1024) == 60
    assert all(name.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0.")) for name in at_1024)
    assert set(at_1024) == {name for name in sdxl.attn2_layers if name.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0."))}
    assert plan.watched_layers(512) == sdxl.attn2_layers


def test_adapter_bytes_per_mode(sdxl):
    rows = 2 * (768 + 1280) * 4
    assert sdxl.adapter_bytes("full", 2) == 545_670_400 * 2 + rows  # ~1.09 GB in bf16
    assert sdxl.adapter_bytes("lora", 2, rank=16) == 12_574_720 * 4 + rows


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_adapter_bytes_match_a_real_tiny_adapter(make_spec, tmp_path, mode):
    trainer = Trainer(make_spec(steps=1, param_mode=mode, lora_rank=4), tmp_path / "run")
    trainer.train_step()
    folder = trainer.export_adapter()
    with safe_open(str(folder / "adapter.safetensors"), "pt") as handle:
        stored = sum(handle.get_tensor(name).numel() * handle.get_tensor(name).element_size() for name in handle.keys())
    assert stored == plan.structure("tiny").adapter_bytes(mode, 2, rank=4)


def test_the_reference_configuration_against_the_naive_h200_step(sdxl):
    """full, bf16 frozen weights, no checkpointing, 1024²: the issue's naive step peaked at 17.4 GB."""
    reference = plan.memory_plan(_spec(param_mode="full", dtype_policy="bf16"))
    frozen_params = sdxl.unet_params - sdxl.attn2_params + sdxl.text_encoder_params + sdxl.text_encoder_2_params + sdxl.image_encoder_params
    assert reference.term("frozen weights").bytes == frozen_params * 2 + sdxl.vae_params * 4
    trainable = sdxl.attn2_params + sdxl.aux_params(2)
    assert reference.term("trainable fp32 masters").bytes == reference.term("gradients").bytes == trainable * 4
    assert reference.term("optimizer (AdamW)").bytes == trainable * 8
    network = 2 * (768 * 768 + 768) + 768 * 2048 + 2048  # the intervention network's two MLP layers and W_out
    assert reference.term("autocast weight copies").bytes == (sdxl.attn2_params + network) * 2
    # An upper bound (all gradients and activations at once) that should sit just above the measured peak:
    # 20.2 GB when this was written, 16% over.
    first_step = reference.first_step_bytes / plan.GB
    assert plan.REFERENCE_PEAK_GB <= first_step <= plan.REFERENCE_PEAK_GB * 1.25, first_step
    checkpointed = plan.memory_plan(_spec(param_mode="full", dtype_policy="bf16", gradient_checkpointing=True))
    # Checkpointing keeps only block inputs and one block's recompute: measured 8.1 -> 1.5 GB.
    assert checkpointed.term("activations").bytes * 4 < reference.term("activations").bytes


def test_every_mode_policy_and_checkpointing_has_a_plan_on_the_tiny_base():
    spec = _spec("tiny", resolution=64, param_mode="lora", dtype_policy="fp32")
    plans = plan.all_plans(spec)
    assert len({(p.param_mode, p.dtype_policy, p.gradient_checkpointing) for p in plans}) == 8
    assert [p.label for p in plans if p.chosen] == ["lora, fp32, no checkpointing"]
    by = {(p.param_mode, p.dtype_policy, p.gradient_checkpointing): p for p in plans}
    shapes = plan.structure("tiny")
    for mode in ("full", "lora"):
        bf16, fp32 = by[(mode, "bf16", False)], by[(mode, "fp32", False)]
        vae = shapes.vae_params * 4  # force_upcast: fp32 under both policies
        assert (fp32.term("frozen weights").bytes - vae) == 2 * (bf16.term("frozen weights").bytes - vae)
        assert bf16.term("autocast weight copies").bytes > 0 and fp32.term("autocast weight copies").bytes == 0
        for policy in ("bf16", "fp32"):
            assert by[(mode, policy, True)].term("activations").bytes < by[(mode, policy, False)].term("activations").bytes
    assert by[("lora", "bf16", False)].term("optimizer (AdamW)").bytes < by[("full", "bf16", False)].term("optimizer (AdamW)").bytes


def test_a_plan_that_does_not_fit_its_share_is_refused_naming_gpus_per_worker():
    spec = _spec("tiny", resolution=64, gpus=0.25, param_mode="lora", dtype_policy="fp32")
    needed = plan.memory_plan(spec).total_bytes / plan.GB  # ~1.1 GB, most of it the CUDA context allowance
    with pytest.raises(plan.PlanError) as refused:
        plan.check_plan_fits(spec, gpu_memory=needed * 4 * 0.99)
    assert refused.value.field == "resources.gpus_per_worker"
    assert "needs" in refused.value.message and "set gpus_per_worker to 0.5" in refused.value.message
    assert plan.check_plan_fits(spec, gpu_memory=needed * 4 * 1.01) is not None
    assert plan.check_plan_fits(_spec("tiny", resolution=64, gpus=0), 0.001) is None  # a CPU job has no GPU plan to check


def test_gpu_memory_comes_from_the_environment():
    assert plan.gpu_memory_gb({}) == 80.0
    assert plan.gpu_memory_gb({"CT2I_GPU_MEMORY_GB": "141"}) == 141.0
    with pytest.raises(plan.PlanError) as bad:
        plan.gpu_memory_gb({"CT2I_GPU_MEMORY_GB": "lots"})
    assert bad.value.field == "CT2I_GPU_MEMORY_GB"


def test_a_local_folder_in_hub_format_is_planned_from_its_own_configs(tmp_path):
    import json
    import shutil

    from causalt2i import tiny

    folder = tmp_path / "my-sdxl"
    shutil.copytree(tiny.TINY_CONFIGS, folder)
    for name in ("tokenizer", "tokenizer_2"):  # hub files write special tokens as AddedToken mappings
        path = folder / name / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["bos_token"] = {"__type": "AddedToken", "content": config["bos_token"], "lstrip": False, "rstrip": False}
        path.write_text(json.dumps(config))
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet["layers_per_block"] = 2
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    clip = tmp_path / "my-clip"  # a full CLIPConfig, as openai/clip-vit-large-patch14 ships it
    clip.mkdir()
    vision = json.loads((tiny.TINY_IMAGE_ENCODER_CONFIGS / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({"projection_dim": vision.pop("projection_dim"), "vision_config": vision, "text_config": {}}))
    mine, reference = plan.structure(str(folder), str(clip)), plan.structure("tiny")
    assert mine.sdxl_configs == str(folder) and mine.image_encoder_configs == str(clip)
    assert mine.unet_params > reference.unet_params  # its own, deeper U-Net
    assert mine.image_encoder_params == reference.image_encoder_params and mine.image_dim == reference.image_dim
