"""Feature extractors on tiny random networks: determinism by seed, the real loaders' file formats
(round-tripped through files written here), CLIP preprocessing and prompt handling, and LPIPS's defining
properties (zero on identical images, positive otherwise, symmetric)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from causalt2i.metrics.extractors import (
    ClipExtractor,
    InceptionExtractor,
    LpipsNetwork,
    MetricSuite,
    _TinyInceptionNetwork,
)
from causalt2i.metrics.scores import clip_t, lpips_diversity, strip_identifier_tokens


# The tests write TorchScript files in the FID model's format with torch.jit.script, deprecated but needed.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning")


def _images(count: int, seed: int, height: int = 48, width: int = 48) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip() -> ClipExtractor:
    return ClipExtractor.tiny(seed=0)


# --------------------------------------------------------------------------------------------- CLIP


def test_clip_text_features_ignore_stripped_identifier_tokens(clip):
    stripped = clip.texts([strip_identifier_tokens("a <s1> cat", ["<s1>"])])
    plain = clip.texts(["a cat"])
    assert torch.equal(stripped, plain)  # bitwise: the same token ids reach the encoder
    # Left in, the token's characters change the features, which is why CLIP-T strips them.
    assert not torch.allclose(clip.texts(["a <s1> cat"]), plain, atol=1e-3)


def test_clip_text_features_do_not_depend_on_the_rest_of_the_batch(clip):
    alone = clip.texts(["a red car"])
    batched = clip.texts(["a dog playing in the snow on a street", "a red car"])
    assert torch.allclose(batched[1:], alone, atol=1e-5)  # padded to full context either way


def test_clip_features_share_one_space_and_feed_clip_t(clip):
    images = clip.images(_images(3, seed=1))
    texts = clip.texts(["a cat", "a dog", "a toy"])
    assert images.shape == texts.shape == (3, clip.feature_dim)
    cosines = torch.nn.functional.cosine_similarity(images.double(), texts.double())
    assert clip_t(images, texts) == pytest.approx(float(cosines.mean()), abs=1e-9)


def test_clip_image_preprocessing_pads_with_the_mean_colour_then_resizes(clip):
    wide = _images(1, seed=2, height=16, width=32)
    padded = clip.image_mean.expand(1, 3, 32, 32).clone()
    padded[:, :, 8:24, :] = wide
    assert torch.equal(clip.preprocess(wide), clip.preprocess(padded))
    pixels = clip.preprocess(wide)
    assert pixels.shape == (1, 3, clip.image_size, clip.image_size)
    # Rows far from the image are pure padding, which normalises to zero.
    assert pixels[:, :, :4].abs().max() < 1e-6


def test_clip_image_features_are_per_image_and_batch_size_free(clip):
    images = _images(5, seed=3, height=40, width=40)
    chunked = ClipExtractor(clip.vision, clip.text, clip.tokenizer, batch_size=2).images(images)
    assert torch.allclose(clip.images(images), chunked, atol=1e-5)
    assert torch.allclose(clip.images(images[2:3]), chunked[2:3], atol=1e-5)


def test_clip_tiny_is_deterministic_by_seed_and_leaves_the_global_rng_alone(clip):
    images = _images(2, seed=4)
    state = torch.get_rng_state()
    again = ClipExtractor.tiny(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.images(images), clip.images(images))
    assert torch.equal(again.texts(["a cat"]), clip.texts(["a cat"]))
    assert not torch.allclose(ClipExtractor.tiny(seed=1).images(images), clip.images(images), atol=1e-4)


def test_clip_rejects_mismatched_projection_spaces(clip):
    other = ClipExtractor.tiny(seed=0)
    other.text.config.projection_dim = 8
    with pytest.raises(ValueError, match="projection_dim"):
        ClipExtractor(clip.vision, other.text, clip.tokenizer)


# ---------------------------------------------------------------------------------------- Inception


def test_inception_tiny_is_deterministic_by_seed():
    images = _images(3, seed=5)
    features = InceptionExtractor.tiny(seed=0).images(images)
    assert features.shape == (3, 32)
    assert torch.equal(InceptionExtractor.tiny(seed=0).images(images), features)
    assert not torch.allclose(InceptionExtractor.tiny(seed=1).images(images), features, atol=1e-4)


def test_inception_from_torchscript_calls_the_network_as_the_fid_model_expects(tmp_path):
    tiny = InceptionExtractor.tiny(seed=0)
    path = tmp_path / "inception.pt"
    torch.jit.script(tiny.network).save(str(path))
    loaded = InceptionExtractor.from_torchscript(path)
    assert loaded.image_size == 299
    images = _images(2, seed=6, height=20, width=30)
    direct = tiny.network(
        torch.nn.functional.interpolate(
            (images * 255).round(), size=(299, 299), mode="bicubic", antialias=True
        ).clamp(0, 255),
        return_features=True,
    )
    assert torch.allclose(loaded.images(images), direct, atol=1e-5)


def test_inception_quantises_to_png_levels():
    extractor = InceptionExtractor.tiny(seed=0)
    images = (torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(7)) / 255.0).float()
    nudged = images + 0.4 / 255.0  # rounds back to the same 8-bit level
    assert torch.equal(extractor.images(images), extractor.images(nudged))


def test_inception_from_torchscript_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception"):
        InceptionExtractor.from_torchscript(tmp_path / "missing.pt")


def test_tiny_inception_network_is_scriptable_with_the_fid_signature():
    network = torch.jit.script(_TinyInceptionNetwork())
    assert network(torch.zeros(1, 3, 16, 16), return_features=True).shape == (1, 32)
    assert network(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


# -------------------------------------------------------------------------------------------- LPIPS


def test_lpips_is_zero_for_identical_images_positive_otherwise_and_symmetric():
    lpips = LpipsNetwork.tiny(seed=0)
    a = _images(3, seed=8, height=64, width=64) * 2 - 1
    b = _images(3, seed=9, height=64, width=64) * 2 - 1
    assert torch.equal(lpips(a, a.clone()), torch.zeros(3))
    forward = lpips(a, b)
    assert (forward > 0).all()
    assert torch.allclose(forward, lpips(b, a), rtol=1e-6, atol=0)


def test_lpips_diversity_of_copies_is_zero_and_of_distinct_images_positive():
    lpips = LpipsNetwork.tiny(seed=0)
    image = _images(1, seed=10, height=64, width=64) * 2 - 1
    assert lpips_diversity(image.expand(4, -1, -1, -1).clone(), lpips) == 0.0
    assert lpips_diversity(_images(4, seed=11, height=64, width=64) * 2 - 1, lpips) > 0.0


def test_lpips_tiny_is_deterministic_by_seed():
    a = _images(2, seed=12, height=64, width=64) * 2 - 1
    b = _images(2, seed=13, height=64, width=64) * 2 - 1
    assert torch.equal(LpipsNetwork.tiny(seed=0)(a, b), LpipsNetwork.tiny(seed=0)(a, b))
    assert not torch.allclose(LpipsNetwork.tiny(seed=1)(a, b), LpipsNetwork.tiny(seed=0)(a, b), rtol=1e-3)


def test_lpips_from_state_dicts_reads_torchvision_and_lpips_package_files(tmp_path):
    source = LpipsNetwork.tiny(seed=3)
    # torchvision's alexnet(): `features.N.*` plus a classifier LPIPS ignores.
    trunk = {f"features.{key}": value for key, value in source.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(4, 4)
    # lpips/weights/v0.1/alex.pth: `lin{k}.model.1.weight` (index 1 sits after a dropout).
    linear = {f"lin{index}.model.1.weight": layer.weight for index, layer in enumerate(source.linear)}
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save(linear, tmp_path / "alex.pth")
    loaded = LpipsNetwork.from_state_dicts(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    a = _images(2, seed=14, height=64, width=64) * 2 - 1
    b = _images(2, seed=15, height=64, width=64) * 2 - 1
    assert torch.equal(loaded(a, b), source(a, b))


def test_lpips_real_layout_has_alexnet_widths():
    network = LpipsNetwork()
    widths = [layer.out_channels for layer in network.features if isinstance(layer, torch.nn.Conv2d)]
    assert widths == [64, 192, 384, 256, 256]
    assert [layer.in_channels for layer in network.linear] == widths


def test_lpips_from_state_dicts_names_the_bad_file(tmp_path):
    source = LpipsNetwork.tiny(seed=0)
    torch.save({f"features.{k}": v for k, v in source.features.state_dict().items()}, tmp_path / "trunk.pth")
    torch.save({"lin0.model.1.weight": source.linear[0].weight}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lpips_linear"):
        LpipsNetwork.from_state_dicts(tmp_path / "trunk.pth", tmp_path / "partial.pth")
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bogus.pth")
    with pytest.raises(ValueError, match="lpips_trunk"):
        LpipsNetwork.from_state_dicts(tmp_path / "bogus.pth", tmp_path / "partial.pth")


# -------------------------------------------------------------------------------------------- Suite


def test_metric_suite_from_config_tiny_equals_tiny_seed_zero():
    images = _images(2, seed=16, height=64, width=64)
    configured, tiny = MetricSuite.from_config(), MetricSuite.tiny(seed=0)
    assert torch.equal(configured.clip.images(images), tiny.clip.images(images))
    assert torch.equal(configured.inception.images(images), tiny.inception.images(images))
    assert torch.equal(configured.lpips(images, images.flip(0)), tiny.lpips(images, images.flip(0)))


def test_metric_suite_from_config_loads_real_format_files(tmp_path):
    source = LpipsNetwork.tiny(seed=5)
    torch.save({f"features.{k}": v for k, v in source.features.state_dict().items()}, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": layer.weight for i, layer in enumerate(source.linear)}, tmp_path / "alex.pth")
    torch.jit.script(InceptionExtractor.tiny(seed=5).network).save(str(tmp_path / "inception.pt"))
    suite = MetricSuite.from_config(
        inception=tmp_path / "inception.pt", lpips_trunk=tmp_path / "alexnet.pth", lpips_linear=tmp_path / "alex.pth"
    )
    assert suite.inception.image_size == 299
    a, b = _images(1, seed=17, height=64, width=64), _images(1, seed=18, height=64, width=64)
    assert torch.equal(suite.lpips(a, b), source(a, b))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inception": "/nonexistent/inception.pt"}, "inception"),
        ({"lpips_trunk": "/nonexistent/alexnet.pth", "lpips_linear": "/nonexistent/alex.pth"}, "lpips_trunk"),
        ({"clip": ""}, "clip"),
    ],
)
def test_metric_suite_from_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        MetricSuite.from_config(**kwargs)


def test_metric_suite_from_config_wants_both_lpips_files_or_neither(tmp_path):
    (tmp_path / "alexnet.pth").write_bytes(b"")
    with pytest.raises(ValidationError, match="lpips_trunk and lpips_linear"):
        MetricSuite.from_config(lpips_trunk=tmp_path / "alexnet.pth")
