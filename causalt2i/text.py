"""Prompt encoding E_T(P) for SDXL (METHOD.md: concat of both encoders' penultimate states; te2 pools).

Identifier tokens are resolved by an explicit `token_ids` map instead of by mutating the tokenizers, so
one resident base can encode prompts for many tenants' adapters, each mapping its own `<s1>` to a slot.
CLIP's BPE works word by word, so splitting the prompt at identifier tokens tokenizes the rest exactly
as the whole string would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causalt2i.models import SDXLParts
from causalt2i.tokens import token_pattern

MAX_TOKENS = 77


class PromptError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


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


def encode_prompts(parts: SDXLParts, prompts: list[str], token_ids: dict[str, int] | None = None, *, field: str = "prompt") -> EncodedPrompts:
    """E_T for a batch of prompts. Gradients flow into the identifier rows when they are trainable."""
    token_ids = token_ids or {}
    device = parts.text_encoder.device
    batches = []
    for tokenizer in (parts.tokenizer, parts.tokenizer_2):
        rows = [tokenize(tokenizer, prompt, token_ids, field=field) for prompt in prompts]
        batches.append(rows)
    lengths = torch.tensor([len(row) for row in batches[0]], device=device)
    ids_1 = torch.tensor([_pad(row, parts.tokenizer.pad_token_id) for row in batches[0]], device=device)
    ids_2 = torch.tensor([_pad(row, parts.tokenizer_2.pad_token_id) for row in batches[1]], device=device)
    out_1 = parts.text_encoder(ids_1, output_hidden_states=True)
    out_2 = parts.text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    valid = torch.arange(MAX_TOKENS, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return EncodedPrompts(embeds=embeds, pooled=out_2.text_embeds, valid=valid, input_ids=ids_1)


def identity_positions(tokenizer, prompt: str, token_ids: dict[str, int], token: str, class_word: str) -> list[int]:
    """Positions in `prompt`'s token sequence of `token` and the class-word tokens right after it.

    These are the tokens of P_i that carry identity, as they appear in P_{n+1} (METHOD.md, A_i).
    """
    ids = tokenize(tokenizer, prompt, token_ids)
    slot = token_ids[token]
    start = ids.index(slot)
    class_len = len(tokenizer(class_word, add_special_tokens=False)["input_ids"])
    return list(range(start, min(start + 1 + class_len, len(ids) - 1)))
