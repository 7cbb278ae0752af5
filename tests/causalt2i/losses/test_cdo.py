import torch

from causalt2i.losses.cdo import intervened_condition
from causalt2i.text import encode_prompts
from causalt2i.trainer import Trainer


def test_the_intervened_condition_changes_the_unet_output(spec, tmp_path):
    trainer = Trainer(spec, tmp_path / "run")
    model = trainer.model
    example = trainer.examples[0]
    noisy = torch.randn(example.latents.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = encode_prompts(model.parts, model.prompts[-1:], model.token_ids)
        added = {"text_embeds": text.pooled, "time_ids": example.time_ids}
        _, f_bar = model.sacd.intervene(example.image_embeds)
        f_bar_joint = f_bar[:, model.n]
        assert f_bar_joint.abs().max() > 0
        condition = intervened_condition(text.embeds, f_bar_joint)
        # f̄ is broadcast over all 77 tokens (float32 rounding of (a + b) − a: 1e-6)
        assert torch.allclose(condition[0, 5] - text.embeds[0, 5], f_bar_joint[0], atol=1e-6)
        assert torch.allclose(condition[0, 70] - text.embeds[0, 70], f_bar_joint[0], atol=1e-6)
        t = torch.tensor([300])
        with_intervention = model.parts.unet(noisy, t, encoder_hidden_states=condition, added_cond_kwargs=added).sample
        plain = model.parts.unet(noisy, t, encoder_hidden_states=text.embeds, added_cond_kwargs=added).sample
    assert not torch.equal(with_intervention, plain)
