"""Generation equals diffusers' own `StableDiffusionXLPipeline` on the same tiny parts, bit for bit.

With identifier tokens the pipeline must pool at EOS (`text_model.eos_token_id` set to the tokenizer's
EOS id): SDXL's configs carry the legacy `eos_token_id: 2`, and then transformers pools at
`argmax(input_ids)`, an identifier token (diffusers#10754; docs/clients.md says what to set).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from causalt2i.generation import initial_latents, make_scheduler

from .conftest import TINY_SIDE, TINY_STEPS, small_request

GUIDANCE = 7.5


def _pipeline(parts, token_ids: dict[str, int]) -> StableDiffusionXLPipeline:
    tokenizers = []
    for tokenizer in (parts.tokenizer, parts.tokenizer_2):
        tokenizer = copy.deepcopy(tokenizer)
        # The adapter's tokens at the ids of their slots, as a plain-diffusers user would add them.
        for token, slot in sorted(token_ids.items(), key=lambda item: item[1]):
            assert tokenizer.add_tokens([token]) == 1 and tokenizer.convert_tokens_to_ids(token) == slot
        tokenizers.append(tokenizer)
    return StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=parts.unet, scheduler=make_scheduler(parts),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _pipeline_pixels(parts, token_ids: dict[str, int], prompt: str, seed: int) -> torch.Tensor:
    pipe = _pipeline(parts, token_ids)
    latents = initial_latents([seed], (parts.unet.config.in_channels, TINY_SIDE // 8, TINY_SIDE // 8))
    with torch.no_grad():
        images = pipe(prompt, num_inference_steps=TINY_STEPS, guidance_scale=GUIDANCE, height=TINY_SIDE, width=TINY_SIDE,
                      latents=latents, output_type="pt").images
    return (images * 255).round().to(torch.uint8).cpu()


@pytest.fixture
def pooling_at_eos(bare):
    """The shared encoders told where EOS really is (restored afterwards: the module's generator shares them).

    The pooling module is `text_model` of CLIPTextModelWithProjection and, in transformers 5, CLIPTextModel
    itself; loading with `eos_token_id=49407` passed to `from_pretrained` sets the same value."""
    pooling = []
    for encoder, tokenizer in ((bare.parts.text_encoder, bare.parts.tokenizer), (bare.parts.text_encoder_2, bare.parts.tokenizer_2)):
        (module,) = [m for m in encoder.modules() if isinstance(getattr(m, "eos_token_id", None), int)]
        pooling.append((module, module.eos_token_id))
        module.eos_token_id = tokenizer.eos_token_id
    yield
    for module, value in pooling:
        module.eos_token_id = value


def test_generation_equals_the_diffusers_pipeline_without_identifier_tokens(bare):
    prompt = "a photo of a cat and a dog in a garden"
    ours = bare(small_request(prompt=prompt, seed=5, guidance=GUIDANCE)).pixels
    assert torch.equal(ours, _pipeline_pixels(bare.parts, {}, prompt, seed=5))


def test_generation_equals_the_pipeline_with_identifier_tokens_once_it_pools_at_eos(bare, cat_dog_adapter, pooling_at_eos):
    bare.use(cat_dog_adapter)
    prompt = "a <s1> cat and a <v1> dog on the beach"
    ours = bare(small_request(prompt=prompt, seed=2, guidance=GUIDANCE)).pixels
    assert torch.equal(ours, _pipeline_pixels(bare.parts, bare.host.token_ids, prompt, seed=2))


def test_the_pipeline_with_the_legacy_eos_id_pools_at_an_identifier_and_differs(bare, cat_dog_adapter):
    bare.use(cat_dog_adapter)
    assert bare.parts.text_encoder_2.config.eos_token_id == 2
    prompt = "a <s1> cat and a <v1> dog on the beach"
    ours = bare(small_request(prompt=prompt, seed=2, guidance=GUIDANCE)).pixels
    assert not torch.equal(ours, _pipeline_pixels(bare.parts, bare.host.token_ids, prompt, seed=2))
