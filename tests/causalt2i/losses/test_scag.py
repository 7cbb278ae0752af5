import torch

from causalt2i.losses.scag import ChannelWeights, attn_loss, identity_maps
from causalt2i.models import attn2_modules
from causalt2i.tokens import identifier_embeddings
from causalt2i.trainer import Trainer


def _trainer(make_spec, tmp_path, **train):
    trainer = Trainer(make_spec(**train), tmp_path / "run")
    example = trainer.examples[0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(example.latents.shape, generator=generator)
    return trainer, example, noise, torch.tensor([500])


def test_attn_loss_gradient_reaches_to_q_to_k_and_the_identifier_rows(make_spec, tmp_path):
    trainer, example, noise, t = _trainer(make_spec, tmp_path)
    terms = trainer.model.loss(example, noise, t, alpha=1.0)
    terms.attn.backward()
    unet = trainer.model.parts.unet
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            assert module.to_q.weight.grad is not None and module.to_q.weight.grad.abs().sum() > 0, name
            assert module.to_k.weight.grad is not None and module.to_k.weight.grad.abs().sum() > 0, name
    for module in identifier_embeddings(trainer.model.parts):
        assert module.rows.grad is not None and (module.rows.grad.abs().sum(-1) > 0).all()


def test_recorder_gives_the_same_maps_with_gradient_checkpointing_and_records_nothing_in_backward(make_spec, tmp_path):
    plain, example, noise, t = _trainer(make_spec, tmp_path / "a")
    checkpointed, _, _, _ = _trainer(make_spec, tmp_path / "b", gradient_checkpointing=True)
    assert checkpointed.model.parts.unet.is_gradient_checkpointing
    maps = []
    grads = []
    for trainer in (plain, checkpointed):
        terms = trainer.model.loss(example, noise, t, alpha=1.0)
        recorded = [m.detach().clone() for m in trainer.model.recorder.maps]
        terms.total().backward()
        # Non-reentrant checkpointing reruns the processors inside backward; nothing may be added then.
        # At 64 px every attn2 of the tiny U-Net has <= 32x32 query tokens, so each is watched once.
        assert len(trainer.model.recorder.maps) == len(recorded) == len(attn2_modules(trainer.model.parts.unet)) == 11
        maps.append(recorded)
        grads.append(trainer.model.parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad.clone())
    for a, b in zip(*maps):
        assert torch.equal(a, b)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_identity_maps_are_min_max_normalised_means_over_identity_tokens():
    attention = torch.rand(1, 77, 4, 4)
    maps = identity_maps(attention, [[2, 3], [6]])
    expected = attention[:, [2, 3]].mean(1)
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-6)
    assert torch.allclose(maps[0, 0], expected[0], atol=1e-6)
    assert maps.amin() >= 0 and maps.amax() <= 1


def test_normalised_gamma_cannot_vanish_and_raw_gamma_can():
    weights = ChannelWeights(2, 8)
    with torch.no_grad():
        weights.beta.fill_(-30.0)
    assert torch.allclose(weights.weights("normalized").sum(-1), torch.full((2,), 8.0))
    assert weights.weights("raw").sum() < 1e-6
    retained, atten = torch.zeros(1, 2, 8), torch.ones(1, 2, 8)
    assert attn_loss(retained, atten, weights.weights("normalized"), lambda_attn=1.0) == 2.0
