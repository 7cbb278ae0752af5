"""The `tiny` preset: SDXL-shaped models from small configs with deterministic random weights.

Everything here is built without downloads, so tests and the demo run offline. The shapes follow SDXL:
two CLIP text encoders whose penultimate hidden states are concatenated (te1 + te2 = cross-attention
width), te2's projected pooled embedding, a `text_time` U-Net, a 4-channel VAE, and a CLIP vision
encoder with projection as E_I.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

TINY_RESOLUTION = 64
# Words that get their own BPE merges, so prompts in tests and the demo tokenize to a few tokens.
_TINY_WORDS = (
    "a an the and of in on with at by photo picture image painting sketch of "
    "cat dog teapot toy person car bear duck robot vase mug shoe ball bird fox owl "
    "red blue green yellow garden beach street forest kitchen park snow city "
    "sitting playing standing together next to play plays near"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def make_tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer generated in code: byte alphabet, `</w>` forms, and merges for common words."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [ch + "</w>" for ch in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    for word in dict.fromkeys(_TINY_WORDS):
        # Merge left to right: ((c1 c2) c3)... ending with the </w> symbol, as CLIP's BPE does.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in known:
                merges.append((current, symbol))
                vocab_list.append(merged)
                known.add(merged)
            current = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def _text_config(hidden: int, projection: int, vocab_size: int, seed_layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=seed_layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


TINY_TE1_HIDDEN = 32
TINY_TE2_HIDDEN = 48
TINY_TE2_PROJECTION = 48
TINY_IMAGE_PROJECTION = 32


def tiny_unet_config() -> dict:
    cross = TINY_TE1_HIDDEN + TINY_TE2_HIDDEN
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TINY_TE2_PROJECTION,
        cross_attention_dim=cross,
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,
    )


def build_tiny_text_encoders(vocab_size: int, seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(seed)
    te1 = CLIPTextModel(_text_config(TINY_TE1_HIDDEN, TINY_TE1_HIDDEN, vocab_size))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(_text_config(TINY_TE2_HIDDEN, TINY_TE2_PROJECTION, vocab_size))
    return te1, te2


def build_tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed + 4)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=TINY_IMAGE_PROJECTION,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config)
