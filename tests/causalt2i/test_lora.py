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
