"""SaCD behaviour on the synthetic construction METHOD.md describes."""

import pytest
import torch

from causalt2i.losses.sacd import SaCD, cst_loss, mean_text_embedding

IMAGE_DIM, TEXT_DIM = 32, 48


def _setup(seed: int):
    torch.manual_seed(seed)
    identity = torch.zeros(IMAGE_DIM, dtype=torch.bool)
    identity[: IMAGE_DIM // 2] = True
    sacd = SaCD(1, IMAGE_DIM, TEXT_DIM)
    with torch.no_grad():  # undo the small output gain: cosine does not care, and it keeps the test readable
        sacd.net.gain.fill_(1.0)
    subject = torch.randn(IMAGE_DIM) * identity
    with torch.no_grad():
        text = sacd.net(subject).expand(2, -1)  # f^s = the network's image of the identity channels
    return sacd, identity, subject, text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_keep_identity_channels_and_drop_noise_channels(seed):
    sacd, identity, subject, text = _setup(seed)
    optimizer = torch.optim.Adam([sacd.mask_logits], lr=5e-2)
    for _ in range(400):
        samples = subject + torch.randn(16, IMAGE_DIM) * (~identity)  # per-sample noise off the identity
        loss = cst_loss(sacd, samples, text, alpha=1.0, form="shifted", grad="masks")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    masks = sacd.masks()
    # Prototype margin (METHOD.md): ~0.8–1.0 on identity channels, ~0.05 on noise channels.
    assert masks[:, identity].mean() > 0.75
    assert masks[:, ~identity].mean() < 0.10


def test_cst_grad_masks_routes_no_gradient_into_the_network_but_through_it():
    sacd, identity, subject, text = _setup(0)
    text = text.clone().requires_grad_(True)
    loss = cst_loss(sacd, subject.unsqueeze(0), text, alpha=1.0, grad="masks")
    loss.backward()
    assert all(p.grad is None for p in sacd.net.parameters())
    assert sacd.mask_logits.grad is not None and sacd.mask_logits.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_cst_grad_all_trains_the_network_too():
    sacd, _, subject, text = _setup(0)
    with torch.no_grad():  # at M = 0.5, f_i and f̄_i coincide and the bias gradients cancel exactly
        sacd.mask_logits.normal_()
    cst_loss(sacd, subject.unsqueeze(0), text, alpha=1.0, grad="all").backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sacd.net.parameters())


def test_shifted_and_raw_forms_match_equation_9_by_hand():
    sacd, _, subject, text = _setup(1)
    image = subject.unsqueeze(0) + 0.3
    f, f_bar = sacd.intervene(image)
    cos = torch.nn.functional.cosine_similarity(f[0], text, dim=-1)
    cos_bar = torch.nn.functional.cosine_similarity(f_bar[0], text, dim=-1)
    shifted = 0.5 * ((1 + cos_bar + 1e-6) / (1 + cos + 1e-6)).sum()
    raw = 0.5 * (cos_bar / cos.clamp_min(1e-6)).sum()
    assert torch.allclose(cst_loss(sacd, image, text, alpha=0.5, form="shifted"), shifted, rtol=1e-6)
    assert torch.allclose(cst_loss(sacd, image, text, alpha=0.5, form="raw"), raw, rtol=1e-6)


def test_text_mean_excludes_padding():
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    means = mean_text_embedding(embeds, valid)
    assert torch.equal(means[0], embeds[0, :2].mean(0))
    assert torch.equal(means[1], embeds[1].mean(0))
