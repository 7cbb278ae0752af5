"""Prompt encoding E_T(P) for SDXL (METHOD.md: concat of both encoders' penultimate states; te2 pools).

The pooled embedding is te2's `text_projection` of its final layer-normed hidden state at the
end-of-text position, located here from the tokenized row. transformers' own `text_embeds` is not used:
with the legacy `eos_token_id: 2` that SDXL's configs carry it pools at `argmax(input_ids)`, which is an
identifier token (ids ≥ 49408) whenever a prompt has one, not EOS (diffusers#10754).

Identifier tokens are resolved by an explicit `token_ids` map instead of by mutating the tokenizers, so
one resident base can encode prompts for many tenants' adapters, each mapping its own `<s1>` to a slot.
CLIP's BPE works word by word, so splitting the prompt at identifier tokens tokenizes the rest exactly
as the whole string would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causalt2i.errors import FieldError
from causalt2i.models import SDXLParts
from causalt2i.tokens import token_pattern

MAX_TOKENS = 77


class PromptError(FieldError):
    """A prompt that cannot be encoded; `field` is `prompt` or `negative_prompt`."""


@dataclass
class EncodedPrompts:
    embeds: torch.Tensor  # [B, 77, D_te1 + D_te2]: E_T(P)
    pooled: torch.Tensor  # [B, D_pool]: te2's projected pooled embedding
    valid: torch.Tensor  # [B, 77] bool: BOS..EOS, padding excluded
    input_ids: torch.Tensor  # [B, 77] ids of tokenizer 1 (identifier tokens as their slot ids)


def tokenize(tokenizer, prompt: str, token_ids: dict[str, int], *, field: str = "prompt") -> list[int]:
    """BOS + ids + EOS for one prompt; identifier tokens are looked up in `token_ids`."""
    ids = [tokenizer.bos_token_id]
    position = 0
    for match in token_pattern(token_ids).finditer(prompt):
        piece = prompt[position : match.start()]
        if piece.strip():
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        token = match.group(0)
        if token not in token_ids:
            known = ", ".join(sorted(token_ids)) or "none"
            raise PromptError(field, f"names identifier token {token!r}, which this model does not have (it has: {known})")
        ids.append(token_ids[token])
        position = match.end()
    tail = prompt[position:]
    if tail.strip():
        ids += tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.eos_token_id)
    if len(ids) > MAX_TOKENS:
        raise PromptError(field, f"is {len(ids)} tokens long with BOS/EOS; the limit is {MAX_TOKENS}")
    return ids


def _pad(ids: list[int], pad_id: int) -> list[int]:
    return ids + [pad_id] * (MAX_TOKENS - len(ids))


@dataclass
class TokenizedPrompts:
    """Both tokenizers' padded ids for a batch of prompts, on the encoders' device."""

    ids_1: torch.Tensor  # [B, 77] tokenizer 1 (pads with <|endoftext|>)
    ids_2: torch.Tensor  # [B, 77] tokenizer 2 (pads with `!` on SDXL)
    lengths: torch.Tensor  # [B] BOS..EOS inclusive in tokenizer 1's rows
    eos_positions_2: torch.Tensor  # [B] where EOS sits in tokenizer 2's rows (te2 pools there)


def tokenize_prompts(parts: SDXLParts, prompts: list[str], token_ids: dict[str, int] | None = None, *, field: str = "prompt") -> TokenizedPrompts:
    """Tokenize once; `encode_tokenized` can then run every step without touching the tokenizers."""
    token_ids = token_ids or {}
    device = parts.text_encoder.device
    rows_1 = [tokenize(parts.tokenizer, prompt, token_ids, field=field) for prompt in prompts]
    rows_2 = [tokenize(parts.tokenizer_2, prompt, token_ids, field=field) for prompt in prompts]
    return TokenizedPrompts(
        ids_1=torch.tensor([_pad(row, parts.tokenizer.pad_token_id) for row in rows_1], device=device),
        ids_2=torch.tensor([_pad(row, parts.tokenizer_2.pad_token_id) for row in rows_2], device=device),
        lengths=torch.tensor([len(row) for row in rows_1], device=device),
        eos_positions_2=torch.tensor([len(row) - 1 for row in rows_2], device=device),
    )


def pooled_at_eos(text_encoder_2, last_hidden_state: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
    """te2's projected pooled embedding: `text_projection` of the final layer-normed state at EOS, [B, D_pool]."""
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    return text_encoder_2.text_projection(last_hidden_state[rows, eos_positions.to(last_hidden_state.device)])


def encode_tokenized(parts: SDXLParts, tokens: TokenizedPrompts) -> EncodedPrompts:
    """E_T for tokenized prompts. Gradients flow into the identifier rows when they are trainable."""
    out_1 = parts.text_encoder(tokens.ids_1, output_hidden_states=True)
    out_2 = parts.text_encoder_2(tokens.ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    valid = torch.arange(MAX_TOKENS, device=tokens.lengths.device).unsqueeze(0) < tokens.lengths.unsqueeze(1)
    pooled = pooled_at_eos(parts.text_encoder_2, out_2.last_hidden_state, tokens.eos_positions_2)
    return EncodedPrompts(embeds=embeds, pooled=pooled, valid=valid, input_ids=tokens.ids_1)


def encode_prompts(parts: SDXLParts, prompts: list[str], token_ids: dict[str, int] | None = None, *, field: str = "prompt") -> EncodedPrompts:
    """E_T for a batch of prompts (tokenize + encode)."""
    return encode_tokenized(parts, tokenize_prompts(parts, prompts, token_ids, field=field))


def identity_positions(tokenizer, prompt: str, token_ids: dict[str, int], token: str, class_word: str) -> list[int]:
    """Positions in `prompt`'s token sequence of `token` and the class-word tokens right after it.

    These are the tokens of P_i that carry identity, as they appear in P_{n+1} (METHOD.md, A_i).
    """
    ids = tokenize(tokenizer, prompt, token_ids)
    slot = token_ids[token]
    start = ids.index(slot)
    class_len = len(tokenizer(class_word, add_special_tokens=False)["input_ids"])
    return list(range(start, min(start + 1 + class_len, len(ids) - 1)))
