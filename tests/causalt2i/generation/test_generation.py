"""Generation on the tiny preset: determinism, in-place adapter switching, subjects alone, bad input.

Pixel comparisons are exact (uint8 equality) unless a tolerance is stated: the same inputs on the same
machine must give the same bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causalt2i.adapter import TE1_ROWS
from causalt2i.generation import GenerationError, Generator, parse_request, size_range
from causalt2i.models import attn2_state, load_sdxl
from causalt2i.text import PromptError

from .conftest import TINY_SIDE, TINY_STEPS, small_request

PLAIN = "a photo of a cat in a garden"


def test_same_seed_gives_identical_pixels_and_another_seed_differs(bare):
    first = bare(small_request(prompt=PLAIN, seed=7))
    again = bare(small_request(prompt=PLAIN, seed=7))
    other = bare(small_request(prompt=PLAIN, seed=8))
    assert first.pixels.shape == (1, 3, TINY_SIDE, TINY_SIDE)
    assert torch.equal(first.pixels, again.pixels)
    # Not merely different: a different seed moves many pixels (mean absolute difference > 1 level).
    assert (first.pixels.float() - other.pixels.float()).abs().mean() > 1.0
    assert first.pixels.float().std() > 1.0, "a constant image would make the comparisons vacuous"


def test_image_depends_on_its_own_seed_not_on_its_batch(bare):
    alone = bare(small_request(prompt=PLAIN, seeds=[5], n=1))
    batched = bare(small_request(prompt=PLAIN, seeds=[3, 5], n=2))
    default_seeds = bare(small_request(prompt=PLAIN, seed=4, n=2))
    assert batched.seeds == [3, 5] and default_seeds.seeds == [4, 5]
    # Batched kernels may reorder float sums; allow one uint8 level.
    assert (alone.pixels[0].int() - batched.pixels[1].int()).abs().max() <= 1
    assert (alone.pixels[0].int() - default_seeds.pixels[1].int()).abs().max() <= 1
    assert not torch.equal(batched.pixels[0], batched.pixels[1])


def test_width_height_and_n_shape_the_output(bare):
    result = bare(small_request(prompt=PLAIN, width=48, height=80, n=3))
    assert result.pixels.shape == (3, 3, 80, 48)
    assert [image.size for image in result.images] == [(48, 80)] * 3
    assert torch.equal(torch.from_numpy(np.array(result.images[2])).permute(2, 0, 1), result.pixels[2])


def test_progress_is_reported_once_per_step(bare):
    calls = []
    bare(small_request(prompt=PLAIN, steps=4), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_negative_prompt_matters_only_with_guidance(bare):
    with_negative = bare(small_request(prompt=PLAIN, negative_prompt="a red dog", guidance=7.5))
    without = bare(small_request(prompt=PLAIN, guidance=7.5))
    assert not torch.equal(with_negative.pixels, without.pixels)
    # guidance <= 1 runs the conditional branch alone, so the negative prompt cannot matter.
    no_cfg_negative = bare(small_request(prompt=PLAIN, negative_prompt="a red dog", guidance=1.0))
    no_cfg = bare(small_request(prompt=PLAIN, guidance=1.0))
    assert torch.equal(no_cfg_negative.pixels, no_cfg.pixels)
    assert not torch.equal(no_cfg.pixels, without.pixels)


def test_adapter_changes_output_and_removing_it_restores_the_base_bitwise(bare, cat_dog_adapter):
    base_image = bare(small_request(prompt=PLAIN)).pixels
    base_weights = {name: tensor.clone() for name, tensor in attn2_state(bare.parts.unet).items()}
    bare.use(cat_dog_adapter)
    adapted = bare(small_request(prompt=PLAIN)).pixels
    assert not torch.equal(adapted, base_image)
    bare.use(None)
    for name, tensor in attn2_state(bare.parts.unet).items():
        assert torch.equal(tensor, base_weights[name]), name
    assert torch.equal(bare(small_request(prompt=PLAIN)).pixels, base_image)


def test_alternating_adapters_a_b_a_gives_a_the_same_image(bare, cat_dog_adapter, other_adapter):
    request = small_request(prompt="a <s1> cat and a <v1> dog in a garden", seed=3)
    bare.use(cat_dog_adapter)
    first_a = bare(request).pixels
    bare.use(other_adapter)
    b = bare(request).pixels
    bare.use(cat_dog_adapter)
    second_a = bare(request).pixels
    assert torch.equal(first_a, second_a)
    assert not torch.equal(first_a, b)


def test_switching_changes_only_the_adapters_tensors(bare, cat_dog_adapter, other_adapter):
    modules = {"unet": bare.parts.unet, "text_encoder": bare.parts.text_encoder, "text_encoder_2": bare.parts.text_encoder_2, "vae": bare.parts.vae}
    bare.use(cat_dog_adapter)
    before = {f"{m}.{k}": v.clone() for m, module in modules.items() for k, v in module.state_dict().items()}
    bare.use(other_adapter)
    after = {f"{m}.{k}": v for m, module in modules.items() for k, v in module.state_dict().items()}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    attn2 = {f"unet.{name}" for name in attn2_state(bare.parts.unet)}
    embedding_tables = {name for name in before if name.endswith("token_embedding.weight")}
    assert changed, "two different adapters must differ somewhere"
    assert changed <= attn2 | embedding_tables
    # Within the embedding tables only the identifier slots (the rows past the base vocabulary) change.
    vocab = len(bare.parts.tokenizer)
    for name in changed & embedding_tables:
        assert torch.equal(before[name][:vocab], after[name][:vocab]), name
    assert cat_dog_adapter.tensors[TE1_ROWS].shape[0] == 2


def test_adapter_tuned_on_cat_and_dog_generates_each_subject_alone(bare, cat_dog_adapter):
    bare.use(cat_dog_adapter)
    cat = bare(small_request(prompt="a photo of a <s1> cat", seed=1)).pixels
    dog = bare(small_request(prompt="a photo of a <v1> dog", seed=1)).pixels
    both = bare(small_request(prompt="a photo of a <s1> cat and a <v1> dog", seed=1)).pixels
    plain_cat = bare(small_request(prompt="a photo of a cat", seed=1)).pixels
    assert len({cat.numpy().tobytes(), dog.numpy().tobytes(), both.numpy().tobytes(), plain_cat.numpy().tobytes()}) == 4
    # The identifier token reaches the U-Net: "<s1> cat" is not "cat".
    assert (cat.float() - plain_cat.float()).abs().mean() > 0.0


def test_size_range_follows_the_base():
    assert size_range(64) == (32, 256)
    assert size_range(1024) == (256, 2048)


LONG_PROMPT = "a photo of " + " and ".join(["a cat"] * 30)

BAD_REQUESTS = [
    pytest.param({"prompt": "a <q1> toy"}, "prompt", id="unknown-identifier-token"),
    pytest.param({"prompt": PLAIN, "guidance": 7.5, "negative_prompt": "a <q1> toy"}, "negative_prompt", id="unknown-token-in-negative"),
    pytest.param({"prompt": LONG_PROMPT}, "prompt", id="prompt-over-77-tokens"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": PLAIN, "steps": 0}, "steps", id="steps-0"),
    pytest.param({"prompt": PLAIN, "steps": 201}, "steps", id="steps-201"),
    pytest.param({"prompt": PLAIN, "guidance": -0.5}, "guidance", id="guidance-negative"),
    pytest.param({"prompt": PLAIN, "guidance": 30.5}, "guidance", id="guidance-30.5"),
    pytest.param({"prompt": PLAIN, "width": 60}, "width", id="width-not-multiple-of-8"),
    pytest.param({"prompt": PLAIN, "height": 100}, "height", id="height-not-multiple-of-8"),
    pytest.param({"prompt": PLAIN, "width": 24}, "width", id="width-below-range"),
    pytest.param({"prompt": PLAIN, "height": 264}, "height", id="height-above-tiny-range"),
    pytest.param({"prompt": PLAIN, "width": 4096}, "width", id="width-above-any-range"),
    pytest.param({"prompt": PLAIN, "n": 0}, "n", id="n-0"),
    pytest.param({"prompt": PLAIN, "n": 17}, "n", id="n-17"),
    pytest.param({"prompt": PLAIN, "n": 2, "seeds": [1]}, "seeds", id="seeds-not-one-per-image"),
    pytest.param({"prompt": PLAIN, "sampler": "euler"}, "sampler", id="unknown-field"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_REQUESTS)
def test_bad_input_is_refused_naming_its_field_before_denoising(bare, cat_dog_adapter, fields, field):
    bare.use(cat_dog_adapter)
    steps_run = []
    with pytest.raises((GenerationError, PromptError)) as caught:
        bare({"steps": TINY_STEPS, **fields}, progress=lambda done, total: steps_run.append(done))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert steps_run == []


def test_long_prompt_is_an_error_not_a_truncation(bare):
    assert len(LONG_PROMPT.split()) > 77
    with pytest.raises(PromptError, match="limit is 77"):
        bare(small_request(prompt=LONG_PROMPT))


def test_adapter_of_another_base_is_refused_naming_the_adapter(cat_dog_adapter):
    other_base = Generator(load_sdxl("tiny", seed=1))
    with pytest.raises(GenerationError) as caught:
        other_base.use(cat_dog_adapter)
    assert caught.value.field == "adapter"
    assert "different base" in str(caught.value)
    assert other_base.active is None


def test_parse_request_without_a_base_checks_only_the_absolute_range():
    assert parse_request({"prompt": PLAIN, "width": 1024}).width == 1024
    with pytest.raises(GenerationError) as caught:
        parse_request({"prompt": PLAIN, "width": 1024}, load_sdxl("tiny"))
    assert caught.value.field == "width" and "32..256" in str(caught.value)
