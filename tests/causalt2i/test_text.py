"""The pooled embedding is te2's projection of the final hidden state at EOS, whatever `eos_token_id` says."""

import torch

from causalt2i.models import load_sdxl
from causalt2i.text import encode_prompts, tokenize_prompts
from causalt2i.tokens import add_identifier_tokens

PROMPT = "a <s1> cat and a <v1> dog"
LONGER = PROMPT + " on the beach"


def _parts_with_tokens():
    parts = load_sdxl("tiny")
    ids = add_identifier_tokens(parts, ["<s1>", "<v1>"], ["cat", "dog"])
    return parts, dict(zip(["<s1>", "<v1>"], ids))


def test_the_preset_carries_the_legacy_eos_id_so_transformers_pools_at_the_last_identifier():
    parts, token_ids = _parts_with_tokens()
    assert parts.text_encoder_2.config.eos_token_id == 2
    tokens = tokenize_prompts(parts, [PROMPT, LONGER], token_ids)
    with torch.no_grad():
        legacy = parts.text_encoder_2(tokens.ids_2).text_embeds
    # argmax(input_ids) is the <v1> slot in both rows; under the causal mask that state cannot see the rest.
    assert torch.equal(legacy[0], legacy[1]), "the preset no longer reproduces the legacy pooling, so the next test proves nothing"


def test_pooled_embedding_sees_the_whole_prompt_and_is_the_projected_state_at_eos():
    parts, token_ids = _parts_with_tokens()
    with torch.no_grad():
        encoded = encode_prompts(parts, [PROMPT, LONGER], token_ids)
        tokens = tokenize_prompts(parts, [PROMPT, LONGER], token_ids)
        hidden = parts.text_encoder_2(tokens.ids_2).last_hidden_state
    assert (encoded.pooled[0] - encoded.pooled[1]).abs().max() > 1e-3, "the pooled embedding ignores ' on the beach'"
    eos = parts.tokenizer_2.eos_token_id
    for row in range(2):
        position = int((tokens.ids_2[row] == eos).nonzero()[0])
        assert position == int(tokens.eos_positions_2[row])
        expected = parts.text_encoder_2.text_projection(hidden[row, position])
        # A one-row matmul against the batched one: BLAS may sum in another order (float32, 1e-6).
        assert torch.allclose(encoded.pooled[row], expected, rtol=0, atol=1e-6)


def test_with_the_real_eos_id_in_the_config_pooling_agrees_with_transformers():
    parts, token_ids = _parts_with_tokens()
    parts.text_encoder_2.text_model.eos_token_id = parts.tokenizer_2.eos_token_id
    with torch.no_grad():
        encoded = encode_prompts(parts, [PROMPT, LONGER], token_ids)
        tokens = tokenize_prompts(parts, [PROMPT, LONGER], token_ids)
        fixed = parts.text_encoder_2(tokens.ids_2).text_embeds
    assert torch.equal(encoded.pooled, fixed)


def test_the_training_objective_uses_the_eos_pooled_embedding(make_spec, tmp_path):
    from causalt2i.trainer import Trainer

    trainer = Trainer(make_spec(steps=2), tmp_path / "run")
    model = trainer.model
    captured = {}
    hook = model.parts.unet.register_forward_pre_hook(lambda _m, args, kwargs: captured.update(kwargs["added_cond_kwargs"]), with_kwargs=True)
    example = trainer.examples[0]
    model.loss(example, torch.zeros_like(example.latents), torch.tensor([10]), alpha=0.0)
    hook.remove()
    with torch.no_grad():
        expected = encode_prompts(model.parts, [model.prompts[-1]], model.token_ids).pooled
        legacy = model.parts.text_encoder_2(model.joint_tokenized.ids_2).text_embeds
    # The joint prompt encoded alone against within the batch of n + 1 prompts: float32 rounding only.
    assert torch.allclose(captured["text_embeds"], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(captured["text_embeds"], legacy, rtol=0, atol=1e-3), "trained on the legacy argmax pooling"
