"""Identifier tokens (`<s1>`, `<v1>`, ...) on both SDXL text encoders (METHOD.md, "Identifier tokens").

Each token is added to both tokenizers in the same order and must get the same id in both; its
embedding row in each encoder starts from that encoder's row(s) for the class word.

Only the new rows train. Instead of training the whole table and restoring every other row after each
step (METHOD.md's recipe: zero gradients alone are not enough, AdamW's weight decay moves them), the
table is frozen and the new rows are a separate parameter spliced in by `IdentifierEmbedding`. The
other rows then cannot move at all, and the optimizer holds n rows of state instead of the whole
vocabulary (100M parameters on SDXL). The tokens test checks bitwise that
nothing but the new rows changes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from causalt2i.models import SDXLParts

# How identifier tokens look in a prompt; used to report one that a model does not have.
IDENTIFIER_PATTERN = re.compile(r"<[A-Za-z0-9_\-]{1,24}>")


def token_pattern(tokens) -> re.Pattern:
    """Matches the given identifier tokens as whole words, and any other `<...>` token."""
    known = [re.escape(t) for t in sorted(tokens, key=len, reverse=True)]
    alternatives = [rf"(?<![\w<]){k}(?![\w>])" for k in known] + [IDENTIFIER_PATTERN.pattern]
    return re.compile("|".join(alternatives))


class TokenError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class IdentifierEmbedding(nn.Module):
    """A token embedding whose rows at `token_ids` come from the trainable `rows`; all others are frozen."""

    def __init__(self, base: nn.Embedding, token_ids: list[int], init_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(init_rows.detach().clone().to(torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `token_embedding.weight` for dtype/device look-ups.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        # slot[b, t] = k if input_ids[b, t] == token_ids[k], else -1
        # No early return when no row is new: `bool(is_new.any())` would sync the host on every forward.
        matches = input_ids.unsqueeze(-1) == self.token_ids
        is_new = matches.any(-1)
        slot = matches.to(torch.long).argmax(-1)
        new = self.rows.to(embeds.dtype)[slot]
        return torch.where(is_new.unsqueeze(-1), new, embeds)


def _token_embedding_owner(text_encoder: nn.Module) -> nn.Module:
    # transformers 5 nests CLIPTextEmbeddings at different depths in CLIPTextModel and ...WithProjection.
    for module in text_encoder.modules():
        if hasattr(module, "token_embedding") and hasattr(module, "position_embedding"):
            return module
    raise RuntimeError(f"{type(text_encoder).__name__} has no CLIP token embedding")


def class_word_rows(tokenizer, embedding: nn.Embedding, class_word: str) -> torch.Tensor:
    ids = tokenizer(class_word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TokenError("class_word", f"{class_word!r} tokenizes to nothing")
    return embedding.weight[ids].detach().float().mean(0)


def add_identifier_tokens(parts: SDXLParts, tokens: list[str], class_words: list[str]) -> list[int]:
    """Add tokens to both tokenizers and encoders; return their ids (the same in both, asserted).

    Embedding tables grow to the tokenizer size; the new rows become trainable `IdentifierEmbedding.rows`,
    initialised from the class word (the mean of its rows when it is several BPE tokens).
    """
    for index, token in enumerate(tokens):
        for tokenizer in (parts.tokenizer, parts.tokenizer_2):
            vocab = tokenizer.get_vocab()
            if token in vocab or f"{token}</w>" in vocab:
                raise TokenError(f"subjects.{index}.token", f"{token!r} is already in the vocabulary")
    added_1 = parts.tokenizer.add_tokens(tokens, special_tokens=False)
    added_2 = parts.tokenizer_2.add_tokens(tokens, special_tokens=False)
    ids_1 = parts.tokenizer.convert_tokens_to_ids(tokens)
    ids_2 = parts.tokenizer_2.convert_tokens_to_ids(tokens)
    if added_1 != len(tokens) or added_2 != len(tokens) or ids_1 != ids_2:
        raise AssertionError(f"identifier tokens got different ids in the two tokenizers: {ids_1} vs {ids_2}")

    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        owner = _token_embedding_owner(encoder)
        table = owner.token_embedding
        if isinstance(table, IdentifierEmbedding):
            raise RuntimeError("identifier tokens were already added to this model")
        old_rows = table.weight.shape[0]
        if max(ids_1) >= old_rows:
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = owner.token_embedding
        init = torch.stack([class_word_rows(tokenizer, table, word) for word in class_words])
        with torch.no_grad():
            table.weight[ids_1] = init.to(table.weight.dtype)
        owner.token_embedding = IdentifierEmbedding(table, ids_1, init)
    return ids_1


def identifier_embeddings(parts: SDXLParts) -> tuple[IdentifierEmbedding, IdentifierEmbedding]:
    pair = (_token_embedding_owner(parts.text_encoder).token_embedding, _token_embedding_owner(parts.text_encoder_2).token_embedding)
    if not all(isinstance(module, IdentifierEmbedding) for module in pair):
        raise RuntimeError("no identifier tokens on this model; call add_identifier_tokens first")
    return pair  # type: ignore[return-value]


def sync_rows_into_tables(parts: SDXLParts) -> None:
    """Write the trained rows into the frozen tables, so the plain table alone holds the tuned model."""
    for module in identifier_embeddings(parts):
        with torch.no_grad():
            module.base.weight[module.token_ids] = module.rows.to(module.base.weight.dtype)

