"""The tiny preset is the official SDXL configs with only size fields shrunk, and the built models carry them."""

import json
from pathlib import Path

import pytest

from causalt2i import tiny
from causalt2i.models import load_sdxl

# The fields a shrunk config may change, per component: widths, depths, layer and head counts, sample
# sizes, and the widths derived from them. Stated here, not read from the code under test.
SIZE_FIELDS = {
    "text_encoder/config.json": {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim"},
    "text_encoder_2/config.json": {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim"},
    "unet/config.json": {"attention_head_dim", "block_out_channels", "cross_attention_dim", "layers_per_block",
                         "transformer_layers_per_block", "sample_size", "projection_class_embeddings_input_dim"},
    "vae/config.json": {"block_out_channels", "layers_per_block", "sample_size"},
    "scheduler/scheduler_config.json": set(),
    "tokenizer/tokenizer_config.json": set(),
    "tokenizer_2/tokenizer_config.json": set(),
    "model_index.json": set(),
}
IMAGE_ENCODER_SIZE_FIELDS = {
    "config.json": {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size", "projection_dim"},
    "preprocessor_config.json": {"crop_size", "size"},
}


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _differing(official: dict, shrunk: dict) -> set[str]:
    return {key for key in official.keys() | shrunk.keys() if official.get(key, KeyError) != shrunk.get(key, KeyError)}


@pytest.mark.parametrize("name", sorted(SIZE_FIELDS))
def test_each_tiny_config_differs_from_the_official_one_only_in_size_fields(name):
    official, shrunk = _read(tiny.OFFICIAL_SDXL_CONFIGS, name), _read(tiny.TINY_CONFIGS, name)
    changed = _differing(official, shrunk)
    assert changed <= SIZE_FIELDS[name], f"{name}: non-size fields differ: {sorted(changed - SIZE_FIELDS[name])}"
    assert set(official) == set(shrunk)


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODER_SIZE_FIELDS))
def test_the_tiny_image_encoder_differs_from_clip_vit_l14_only_in_size_fields(name):
    official, shrunk = _read(tiny.OFFICIAL_IMAGE_ENCODER_CONFIGS, name), _read(tiny.TINY_IMAGE_ENCODER_CONFIGS, name)
    changed = _differing(official, shrunk)
    assert changed <= IMAGE_ENCODER_SIZE_FIELDS[name], sorted(changed - IMAGE_ENCODER_SIZE_FIELDS[name])


def test_the_shrunk_sizes_stay_consistent():
    unet = _read(tiny.TINY_CONFIGS, "unet/config.json")
    te1 = _read(tiny.TINY_CONFIGS, "text_encoder/config.json")
    te2 = _read(tiny.TINY_CONFIGS, "text_encoder_2/config.json")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == 6 * 256 + te2["projection_dim"]
    assert all(width % unet["norm_num_groups"] == 0 for width in unet["block_out_channels"])


def test_the_official_configs_carry_the_fields_that_matter():
    """What reference/sdxl-configs.md lists, as the repository keeps it."""
    folder = tiny.OFFICIAL_SDXL_CONFIGS
    for name, act, hidden in (("text_encoder", "quick_gelu", 768), ("text_encoder_2", "gelu", 1280)):
        config = _read(folder, f"{name}/config.json")
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 1)
        assert (config["hidden_act"], config["hidden_size"], config["vocab_size"]) == (act, hidden, 49408)
    unet = _read(folder, "unet/config.json")
    assert unet["projection_class_embeddings_input_dim"] == 2816 and unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["attention_head_dim"] == [5, 10, 20]
    vae = _read(folder, "vae/config.json")
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    scheduler = _read(folder, "scheduler/scheduler_config.json")
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"], scheduler["prediction_type"]) == ("leading", 1, "epsilon")
    assert _read(folder, "tokenizer/tokenizer_config.json")["pad_token"] == "<|endoftext|>"
    assert _read(folder, "tokenizer_2/tokenizer_config.json")["pad_token"] == "!"


def test_the_tiny_models_are_built_from_those_configs():
    parts = load_sdxl("tiny")
    for encoder, act in ((parts.text_encoder, "quick_gelu"), (parts.text_encoder_2, "gelu")):
        config = encoder.config
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 2, 1)
        assert config.hidden_act == act and config.vocab_size == 49408
        assert encoder.get_input_embeddings().weight.shape[0] == 49408
    assert parts.unet.config.addition_time_embed_dim == 256
    assert parts.unet.config.norm_num_groups == 32
    assert list(parts.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert parts.vae.config.scaling_factor == 0.13025 and parts.vae.config.force_upcast is True
    scheduler = parts.noise_scheduler.config
    assert (scheduler.timestep_spacing, scheduler.steps_offset, scheduler.prediction_type) == ("leading", 1, "epsilon")
    assert parts.image_encoder.config.hidden_act == "quick_gelu"


def test_the_tokenizers_have_clips_vocabulary_special_ids_padding_and_case():
    parts = load_sdxl("tiny")
    for tokenizer, pad, pad_id in ((parts.tokenizer, "<|endoftext|>", 49407), (parts.tokenizer_2, "!", 0)):
        assert len(tokenizer) == 49408
        assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == (pad, pad_id)
        assert tokenizer.model_max_length == 77
        assert tokenizer("A Photo of a CAT")["input_ids"] == tokenizer("a photo of a cat")["input_ids"]
        # Common words are one token each, so test prompts stay short.
        assert len(tokenizer("a photo of a cat on the beach", add_special_tokens=False)["input_ids"]) == 8
    padded = parts.tokenizer_2("a cat", padding="max_length", max_length=77)["input_ids"]
    assert padded[:4] == [49406, parts.tokenizer_2.convert_tokens_to_ids("a</w>"), parts.tokenizer_2.convert_tokens_to_ids("cat</w>"), 49407]
    assert set(padded[4:]) == {0}
