"""The `tiny` preset: real SDXL component configs with only their sizes shrunk, and random weights.

The configs live as JSON files in `causalt2i/configs/`, laid out like the hub folders they come from:

- `sdxl-base-1.0/`: the official `stabilityai/stable-diffusion-xl-base-1.0` configs (tokenizers, both text
  encoders, U-Net, VAE, scheduler, model_index), full size;
- `clip-vit-large-patch14/`: the vision tower of `openai/clip-vit-large-patch14` (E_I) and its
  preprocessing;
- `tiny/`: the same files with widths, depths, layer and head counts and sample sizes shrunk, and nothing
  else changed (`tests/causalt2i/test_tiny_configs.py` checks that field by field).

So the tiny models carry the fields where the real model's behaviour hides: the text encoders' legacy
`bos/eos/pad_token_id` 0/2/1 (transformers then pools `text_embeds` at `argmax(input_ids)`), `quick_gelu`
in te1 and `gelu` in te2, `addition_time_embed_dim` 256, `norm_num_groups` 32, the VAE's
`scaling_factor` and `force_upcast`, the scheduler's spacing, offset and prediction type.

The tokenizers are CLIP-format BPE tokenizers generated in code (no download): the byte alphabet, one
merge chain per common word (so test prompts stay short), unused filler entries up to the real
vocabulary of 49408, `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407, lower-cased, padding as the
configs say (`tokenizer` with `<|endoftext|>`, `tokenizer_2` with `!`, id 0).

`build_sdxl_components` builds the models from any such folder; under `torch.device("meta")` it builds the
full-size SDXL without allocating memory (`causalt2i.plan`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

CONFIG_ROOT = Path(__file__).parent / "configs"
OFFICIAL_SDXL_CONFIGS = CONFIG_ROOT / "sdxl-base-1.0"
OFFICIAL_IMAGE_ENCODER_CONFIGS = CONFIG_ROOT / "clip-vit-large-patch14"
TINY_CONFIGS = CONFIG_ROOT / "tiny"
TINY_IMAGE_ENCODER_CONFIGS = TINY_CONFIGS / "image_encoder"
OFFICIAL_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

# Where each component's config sits inside a diffusers-layout folder.
CONFIG_FILES = {
    "model_index": "model_index.json",
    "tokenizer": "tokenizer/tokenizer_config.json",
    "tokenizer_2": "tokenizer_2/tokenizer_config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
IMAGE_ENCODER_FILES = {"image_encoder": "config.json", "image_processor": "preprocessor_config.json"}

CLIP_VOCAB_SIZE = 49408
# Words that get their own BPE merges, so prompts in tests, the demo and the evaluation templates
# tokenize to one token per word.
_TINY_WORDS = (
    "a an the and of in on with at by photo picture image painting sketch watercolor "
    "cat dog teapot toy person car bear duck robot vase mug shoe ball bird fox owl "
    "red blue green yellow garden beach street forest kitchen park snow city desert lawn "
    "sitting playing standing together next to play plays near wooden table front wall top "
    "mountain floating water night under stars living room"
).split()


def read_config(folder: str | Path, component: str) -> dict:
    """One component's config from a diffusers-layout folder (`CONFIG_FILES`) or an E_I folder."""
    name = CONFIG_FILES.get(component) or IMAGE_ENCODER_FILES[component]
    return json.loads((Path(folder) / name).read_text())


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


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, index = min(pairs)
        if rank > len(ranks):
            break
        symbols = symbols[:index] + [symbols[index] + symbols[index + 1]] + symbols[index + 2 :]
    return symbols


@lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [ch + "</w>" for ch in alphabet]
    known = set(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(_TINY_WORDS):
        # Add merges until the word is one symbol under the merges so far (earlier words' merges rank first).
        while len(symbols := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(ranks)
            if pair[0] + pair[1] not in known:
                vocab.append(pair[0] + pair[1])
                known.add(pair[0] + pair[1])
    # Unused entries fill the vocabulary to CLIP's size, so the special tokens get their real ids.
    # No merge produces them, so no text ever tokenizes to one.
    vocab += [f"<|unused{index}|>" for index in range(CLIP_VOCAB_SIZE - 2 - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(vocab), tuple(sorted(ranks, key=ranks.get))


def make_clip_tokenizer(config: dict | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer generated in code with the special tokens, padding and length of `config`

    (a `tokenizer_config.json`; default: SDXL's `tokenizer`)."""
    config = config or read_config(TINY_CONFIGS, "tokenizer")
    if not config.get("do_lower_case", True):
        raise ValueError("the generated CLIP tokenizer always lower-cases, as CLIP's does")
    vocab, merges = _tiny_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=list(merges),
        bos_token=_token_text(config.get("bos_token", "<|startoftext|>")),
        eos_token=_token_text(config.get("eos_token", "<|endoftext|>")),
        unk_token=_token_text(config.get("unk_token", "<|endoftext|>")),
        pad_token=_token_text(config.get("pad_token", "<|endoftext|>")),
    )
    tokenizer.model_max_length = config.get("model_max_length", 77)
    return tokenizer


def _token_text(value) -> str:
    """A special token as a hub `tokenizer_config.json` writes it: a string or an AddedToken mapping."""
    return value["content"] if isinstance(value, dict) else value


def make_tiny_clip_tokenizer() -> CLIPTokenizer:
    """The tiny preset's `tokenizer` (pads with `<|endoftext|>`); also what the tiny metric CLIP uses."""
    return make_clip_tokenizer(read_config(TINY_CONFIGS, "tokenizer"))


def _model_kwargs(config: dict) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_") and key not in ("architectures", "model_type", "torch_dtype")}


def vision_config(config: dict) -> CLIPVisionConfig:
    """E_I's config from a vision-only `config.json` or a full CLIP one (as `openai/clip-vit-large-patch14`'s)."""
    if "vision_config" in config:
        config = {**config["vision_config"], "projection_dim": config["projection_dim"]}
    return CLIPVisionConfig(**_model_kwargs(config))


def build_sdxl_components(sdxl_configs: str | Path, image_encoder_configs: str | Path, *, seed: int = 0) -> dict:
    """Tokenizers, text encoders, U-Net, VAE, scheduler config and E_I from config folders.

    Weights are random and deterministic by `seed`; under `torch.device("meta")` nothing is allocated.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**_model_kwargs(read_config(sdxl_configs, "text_encoder"))))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_model_kwargs(read_config(sdxl_configs, "text_encoder_2"))))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel.from_config(read_config(sdxl_configs, "unet"))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL.from_config(read_config(sdxl_configs, "vae"))
    torch.manual_seed(seed + 4)
    image_encoder = CLIPVisionModelWithProjection(vision_config(read_config(image_encoder_configs, "image_encoder")))
    return {
        "tokenizer": make_clip_tokenizer(read_config(sdxl_configs, "tokenizer")),
        "tokenizer_2": make_clip_tokenizer(read_config(sdxl_configs, "tokenizer_2")),
        "text_encoder": te1,
        "text_encoder_2": te2,
        "unet": unet,
        "vae": vae,
        "scheduler_config": read_config(sdxl_configs, "scheduler"),
        "image_encoder": image_encoder,
    }


def build_tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    """The tiny E_I alone (the shrunk CLIP ViT-L/14 vision tower)."""
    torch.manual_seed(seed + 4)
    return CLIPVisionModelWithProjection(vision_config(read_config(TINY_IMAGE_ENCODER_CONFIGS, "image_encoder")))


TINY_RESOLUTION = read_config(TINY_CONFIGS, "vae")["sample_size"]
