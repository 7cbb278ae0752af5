"""`param_mode: lora`: only the LoRA factors train, and the merged adapter reproduces the trained U-Net."""

import torch

from causalt2i.adapter import AdapterHost, load_adapter
from causalt2i.models import attn2_state, load_sdxl
from causalt2i.trainer import Trainer


def test_lora_trains_factors_only_and_the_applied_adapter_matches_the_trained_unet(make_spec, tmp_path):
    trainer = Trainer(make_spec(param_mode="lora", lora_rank=4, steps=3), tmp_path / "run")
    base = {k: v.detach().clone() for k, v in attn2_state(trainer.model.parts.unet).items()}
    for _ in range(3):
        trainer.train_step()
    for name, tensor in attn2_state(trainer.model.parts.unet).items():
        assert torch.equal(tensor, base[name]), f"{name}: a base weight moved under LoRA"
    lora_b = [m.lora_B["default"].weight for m in trainer.model.lora.values()]
    assert any(b.abs().sum() > 0 for b in lora_b), "LoRA B never left zero"

    adapter = load_adapter(trainer.export_adapter())
    assert adapter.manifest.param_mode == "lora" and adapter.manifest.lora_rank == 4
    assert all(".lora_A." in k or ".lora_B." in k or k.endswith("token_embeddings") for k in adapter.tensors)

    fresh = load_sdxl("tiny")
    AdapterHost(fresh).apply(adapter)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, trainer.model.parts.text_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 48, generator=generator), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        trained_out = trainer.model.parts.unet(sample, torch.tensor([10]), encoder_hidden_states=context, added_cond_kwargs=added).sample
        merged_out = fresh.unet(sample, torch.tensor([10]), encoder_hidden_states=context, added_cond_kwargs=added).sample
    # Merging B·A into W in fp32 reorders the sums of the unmerged forward: 1e-5 covers that rounding.
    assert torch.allclose(trained_out, merged_out, rtol=1e-4, atol=1e-5)


def test_the_factors_carry_peft_names_and_the_spec_sets_alpha_and_dropout(make_spec, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from causalt2i.lora import lora_tensors

    trainer = Trainer(make_spec(param_mode="lora", lora_rank=4, lora_alpha=2.0, lora_dropout=0.25, steps=1), tmp_path / "run")
    unet = trainer.model.parts.unet
    assert set(lora_tensors(trainer.model.lora)) == set(get_peft_model_state_dict(unet, adapter_name="default"))
    for layer in trainer.model.lora.values():
        assert layer.scaling["default"] == 0.5 and layer.lora_dropout["default"].p == 0.25
        assert layer.lora_A["default"].weight.dtype == torch.float32
    manifest = load_adapter(trainer.export_adapter()).manifest
    assert (manifest.lora_rank, manifest.lora_alpha, manifest.lora_scale) == (4, 2.0, 0.5)


def test_a_resume_with_lora_dropout_is_exact(make_spec, tmp_path):
    """Dropout draws from torch's global RNG; the checkpoint restores it, so k steps + resume + N − k = N steps."""
    spec = make_spec(param_mode="lora", lora_rank=4, lora_dropout=0.5, lr=1e-2, steps=4)
    straight = Trainer(spec, tmp_path / "straight")
    for _ in range(4):
        straight.train_step()
    first = Trainer(spec, tmp_path / "first")
    for _ in range(2):
        first.train_step()
    state = first.state_dict()

    def resumed(checkpoint: dict, name: str) -> dict:
        trainer = Trainer(spec, tmp_path / name)  # re-seeds torch's RNG, as a fresh process would
        trainer.load_state_dict(checkpoint)
        for _ in range(2):
            trainer.train_step()
        return trainer.model.named_trainable()

    expected = straight.model.named_trainable()
    for name, tensor in resumed(state, "resumed").items():
        assert torch.equal(tensor, expected[name]), name
    without_rng = {k: v for k, v in state.items() if k != "torch_rng"}
    lost = resumed(without_rng, "without-rng")
    assert any(not torch.equal(lost[k], expected[k]) for k in expected if ".lora_" in k), "dropout had no effect, so this test could not fail"
