"""Feature extractors behind the metrics: CLIP (E_I, E_T), Inception (E_F) and LPIPS (φ_l, w_l).

Each one is injectable: a real loader reads weights from a local path or a hub id, and a `tiny(seed)`
preset builds the same code from small random layers, so tests never download anything. Image inputs
are float tensors [N, 3, H, W] with values in [0, 1] (LPIPS alone takes [-1, 1], its own convention);
every resize and normalisation happens inside, on the tensor, so any image size is accepted.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

# OpenAI CLIP's preprocessing statistics, shared by the OpenAI and OpenCLIP checkpoints on the hub.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_IMAGE_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
TINY = "tiny"


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected [N, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor, got {images.dtype}")


def _pad_to_square(images: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    height, width = images.shape[-2:]
    if height == width:
        return images
    side = max(height, width)
    canvas = fill.to(images).expand(images.shape[0], 3, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, :, top : top + height, left : left + width] = images
    return canvas


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    # Antialiased bicubic is what PIL does in the reference preprocessors (CLIPImageProcessor, clean-fid).
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


# --------------------------------------------------------------------------------------------- CLIP


class ClipExtractor(nn.Module):
    """CLIP's E_I (image) and E_T (text) encoders, each with its projection into the shared embedding space.

    `images(x)` gives the E_I features of CLIP-I (Eq. 14) and CLIP-T (Eq. 16); `texts(prompts)` gives the E_T
    features of CLIP-T. Preprocessing runs on the tensor: pad to a square with the mean colour (so the
    border is zero after normalisation), resize to the vision model's `image_size`, then CLIP mean/std.
    """

    def __init__(
        self,
        vision: CLIPVisionModelWithProjection,
        text: CLIPTextModelWithProjection,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_mean: tuple[float, float, float] = CLIP_IMAGE_MEAN,
        image_std: tuple[float, float, float] = CLIP_IMAGE_STD,
        batch_size: int = 32,
    ):
        super().__init__()
        if vision.config.projection_dim != text.config.projection_dim:
            raise ValueError(
                f"text: projection_dim {text.config.projection_dim} differs from the vision model's "
                f"{vision.config.projection_dim}; E_I and E_T must share one embedding space"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.vision = _freeze(vision)
        self.text = _freeze(text)
        self.tokenizer = tokenizer
        self.image_size = int(vision.config.image_size)
        self.max_length = min(int(tokenizer.model_max_length), int(text.config.max_position_embeddings))
        self.batch_size = batch_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return int(self.vision.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, *, dtype: torch.dtype = torch.float32) -> ClipExtractor:
        """The real encoders from a local folder or a hub id (e.g. `openai/clip-vit-large-patch14`)."""
        source = str(path_or_hub_id)
        vision = CLIPVisionModelWithProjection.from_pretrained(source, dtype=dtype)
        text = CLIPTextModelWithProjection.from_pretrained(source, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source)
        return cls(vision, text, tokenizer)

    @classmethod
    def tiny(cls, seed: int = 0) -> ClipExtractor:
        """Small random CLIP encoders (deterministic by `seed`) with the shared tiny tokenizer; no downloads."""
        from causalt2i.tiny import make_tiny_clip_tokenizer

        tokenizer = make_tiny_clip_tokenizer()
        vision_config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
            hidden_act="gelu",
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=16,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        # A private RNG stream: building the preset must not move the caller's global seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vision = CLIPVisionModelWithProjection(vision_config)
            text = CLIPTextModelWithProjection(text_config)
        return cls(vision, text, tokenizer)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> the vision model's normalised [N, 3, S, S] input."""
        _check_images("images", images)
        images = _pad_to_square(images, self.image_mean)
        images = _resize(images, self.image_size).clamp(0.0, 1.0)
        return (images - self.image_mean) / self.image_std

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """E_I: float images [N, 3, H, W] in [0, 1] -> projected image features [N, d] (float32, not normalised)."""
        _check_images("images", images)
        device, dtype = _device_and_dtype(self.vision)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(device=device, dtype=torch.float32)
            pixels = self.preprocess(batch).to(dtype)
            chunks.append(self.vision(pixel_values=pixels).image_embeds.float())
        return torch.cat(chunks) if chunks else torch.empty(0, self.feature_dim, device=device)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """E_T: N prompts -> projected text features [N, d] (float32, not normalised).

        Prompts are padded to the model's full context length, so a prompt's features do not depend on
        the other prompts of the batch.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts: expected a list of strings, got one string")
        device, _ = _device_and_dtype(self.text)
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            output = self.text(input_ids=encoded.input_ids.to(device), attention_mask=encoded.attention_mask.to(device))
            chunks.append(output.text_embeds.float())
        return torch.cat(chunks) if chunks else torch.empty(0, self.feature_dim, device=device)


# ---------------------------------------------------------------------------------------- Inception


class _TinyInceptionNetwork(nn.Module):
    """A small conv net with the FID Inception TorchScript's calling convention: [0, 255] input, `return_features`."""

    def __init__(self, feature_dim: int = 32, num_classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, feature_dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.layers((images - 128.0) / 128.0)
        if return_features:
            return features
        return self.head(features)


class InceptionExtractor(nn.Module):
    """E_F of KID (Eq. 15): pool features of the FID Inception-v3 network, or a tiny stand-in.

    The wrapped `network` follows the convention of the standard TorchScript model
    (`inception-2015-12-05.pt`, used by StyleGAN2-ADA/3 and clean-fid): called as
    `network(images, return_features=True)` on float images with values in [0, 255], it returns the
    features [N, d] (2048-d pool3 for the real one) and normalises internally. Before the call, images
    are quantised to the 256 levels a saved PNG has and resized to `image_size` (299 for the real model)
    with antialiased bicubic, as clean-fid does.
    """

    def __init__(self, network: nn.Module, *, image_size: int = INCEPTION_IMAGE_SIZE, batch_size: int = 32):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.network = _freeze(network)
        self.image_size = image_size
        self.batch_size = batch_size

    @classmethod
    def from_torchscript(cls, path: str | Path, *, device: str | torch.device = "cpu") -> InceptionExtractor:
        """The real E_F from the FID Inception TorchScript file (`inception-2015-12-05.pt`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"inception: no such file: {path}")
        # The standard FID weights exist only as TorchScript, so its deprecation notice is expected here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.load")
            network = torch.jit.load(str(path), map_location=device)
        return cls(network, image_size=INCEPTION_IMAGE_SIZE)

    @classmethod
    def tiny(cls, seed: int = 0) -> InceptionExtractor:
        """A small random conv net (deterministic by `seed`), 32-d features from 32x32 inputs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = _TinyInceptionNetwork()
        return cls(network, image_size=32)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """E_F: float images [N, 3, H, W] in [0, 1] -> Inception features [N, d] (float32)."""
        _check_images("images", images)
        device = next(iter(self.network.parameters())).device
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(device=device, dtype=torch.float32)
            levels = (batch.clamp(0.0, 1.0) * 255.0).round()
            levels = _resize(levels, self.image_size).clamp(0.0, 255.0)
            features = self.network(levels, return_features=True)
            chunks.append(features.reshape(batch.shape[0], -1).float())
        return torch.cat(chunks) if chunks else torch.empty(0, 0, device=device)


# -------------------------------------------------------------------------------------------- LPIPS

ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
# Indices of the conv layers in torchvision's `alexnet().features`, and of the ReLUs LPIPS taps (relu1..relu5).
_ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
_ALEXNET_TAP_INDICES = (1, 4, 7, 9, 11)
_LPIPS_EPS = 1e-10


def _alexnet_features(channels: tuple[int, int, int, int, int]) -> nn.Sequential:
    """torchvision's `alexnet().features` layout, with configurable widths (so its state dict loads as is)."""
    c1, c2, c3, c4, c5 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c3, c4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c4, c5, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _trunk_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept torchvision's full AlexNet (`features.0.weight`), its `features` alone (`0.weight`), or the
    lpips package's slices (`net.slice2.3.weight`, which keep torchvision's indices)."""
    trunk = {}
    for key, value in raw.items():
        if key.startswith("classifier."):
            continue
        match = re.fullmatch(r"(?:features\.|net\.slice\d\.)?(\d+\.(?:weight|bias))", key)
        if match is None:
            raise ValueError(f"lpips_trunk: unexpected key {key!r} (expected AlexNet `features.N.weight|bias`)")
        trunk[match.group(1)] = value
    return trunk


def _linear_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the lpips package's `lin{k}.model.{i}.weight` (i = 1 after its dropout) or bare `{k}.weight`."""
    linear = {}
    for key, value in raw.items():
        match = re.fullmatch(r"(?:lin(\d)\.model\.\d+|(\d))\.weight", key)
        if match is None:
            raise ValueError(f"lpips_linear: unexpected key {key!r} (expected `lin{{k}}.model.1.weight`)")
        linear[f"{match.group(1) or match.group(2)}.weight"] = value
    return linear


def _load_tensors(field: str, path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no such file: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{field}: {path} does not hold a state dict")
    return state


class LpipsNetwork(nn.Module):
    """LPIPS (Zhang et al. 2018, v0.1) on an AlexNet trunk: the distance of Eq. 17.

    d(x0, x1) = Σ_l (1 / H_l W_l) Σ_hw w_l · (φ̂_l(x0) - φ̂_l(x1))², where φ̂_l is the relu-l activation
    normalised to unit length along channels and w_l ≥ 0 the learned 1x1 weights. This is Eq. 17's
    ||w_l ⊙ (φ̂_l(x0) - φ̂_l(x1))||² / (H_l W_l) with the paper's w_l being the square root of these weights.
    Inputs are in [-1, 1] (the LPIPS convention) and pass through LPIPS's fixed scaling layer first.
    """

    def __init__(self, channels: tuple[int, int, int, int, int] = ALEXNET_CHANNELS):
        super().__init__()
        self.features = _alexnet_features(channels)
        self.linear = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width in channels)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    @classmethod
    def from_state_dicts(cls, trunk_path: str | Path, linear_path: str | Path) -> LpipsNetwork:
        """The real LPIPS-Alex: torchvision AlexNet weights (`alexnet-owt-7be5be79.pth`) as the trunk and the
        lpips package's `weights/v0.1/alex.pth` as the linear layers. Widths come from the weights."""
        trunk = _trunk_state_dict(_load_tensors("lpips_trunk", trunk_path))
        linear = _linear_state_dict(_load_tensors("lpips_linear", linear_path))
        try:
            channels = tuple(int(trunk[f"{index}.weight"].shape[0]) for index in _ALEXNET_CONV_INDICES)
        except KeyError as err:
            raise ValueError(f"lpips_trunk: missing conv weight {err.args[0]!r}") from None
        network = cls(channels)  # type: ignore[arg-type]
        try:
            network.features.load_state_dict(trunk, strict=True)
        except RuntimeError as err:
            raise ValueError(f"lpips_trunk: {err}") from None
        try:
            network.linear.load_state_dict(linear, strict=True)
        except RuntimeError as err:
            raise ValueError(f"lpips_linear: {err}") from None
        return network

    @classmethod
    def tiny(cls, seed: int = 0) -> LpipsNetwork:
        """The same network with narrow random layers and random non-negative linear weights, by `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = cls((8, 16, 16, 16, 16))
            for layer in network.linear:
                layer.weight.copy_(torch.rand_like(layer.weight))
        return network

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] in [-1, 1] -> the channel-normalised relu1..relu5 activations φ̂_l."""
        hidden = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in _ALEXNET_TAP_INDICES:
                norm = hidden.pow(2).sum(dim=1, keepdim=True).sqrt()
                taps.append(hidden / (norm + _LPIPS_EPS))
                if len(taps) == len(_ALEXNET_TAP_INDICES):
                    break
        return taps

    @torch.no_grad()
    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """LPIPS distances [B] between images_a[k] and images_b[k]; both [B, 3, H, W] in [-1, 1].

        Each side goes through the trunk on its own, so a pair of identical images gives exactly 0.
        """
        _check_images("images_a", images_a)
        _check_images("images_b", images_b)
        if images_a.shape != images_b.shape:
            raise ValueError(f"images_b: shape {tuple(images_b.shape)} differs from images_a's {tuple(images_a.shape)}")
        device, dtype = _device_and_dtype(self)
        feats_a = self.layer_features(images_a.to(device=device, dtype=dtype))
        feats_b = self.layer_features(images_b.to(device=device, dtype=dtype))
        total = torch.zeros(images_a.shape[0], device=device, dtype=dtype)
        for linear, phi_a, phi_b in zip(self.linear, feats_a, feats_b):
            total = total + linear((phi_a - phi_b) ** 2).mean(dim=(1, 2, 3))
        return total


# -------------------------------------------------------------------------------------------- Suite


class MetricsConfig(BaseModel):
    """Where each metric network comes from: `tiny` (random, for tests and the embedded default) or real weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: str = Field(TINY, min_length=1, description="CLIP: `tiny`, a local folder or a hub id")
    inception: str = Field(TINY, min_length=1, description="FID Inception TorchScript file (inception-2015-12-05.pt), or `tiny`")
    lpips_trunk: str = Field(TINY, min_length=1, description="torchvision AlexNet state dict, or `tiny`")
    lpips_linear: str = Field(TINY, min_length=1, description="lpips v0.1 alex.pth linear weights, or `tiny`")

    @field_validator("inception", "lpips_trunk", "lpips_linear")
    @classmethod
    def _file_exists(cls, value: str) -> str:
        if value != TINY and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _lpips_both_or_neither(self) -> MetricsConfig:
        if (self.lpips_trunk == TINY) != (self.lpips_linear == TINY):
            raise ValueError("lpips_trunk and lpips_linear must both be `tiny` or both be files")
        return self


@dataclass
class MetricSuite:
    """The three networks the metrics need: CLIP (CLIP-I, CLIP-T), Inception (KID) and LPIPS (diversity)."""

    clip: ClipExtractor
    inception: InceptionExtractor
    lpips: LpipsNetwork

    @classmethod
    def tiny(cls, seed: int = 0) -> MetricSuite:
        return cls(clip=ClipExtractor.tiny(seed), inception=InceptionExtractor.tiny(seed), lpips=LpipsNetwork.tiny(seed))

    @classmethod
    def from_config(
        cls,
        *,
        clip: str | Path = TINY,
        inception: str | Path = TINY,
        lpips_trunk: str | Path = TINY,
        lpips_linear: str | Path = TINY,
        device: str | torch.device = "cpu",
    ) -> MetricSuite:
        """Validate the sources (errors name the field), then load each network; `tiny` ones use seed 0."""
        config = MetricsConfig(
            clip=str(clip), inception=str(inception), lpips_trunk=str(lpips_trunk), lpips_linear=str(lpips_linear)
        )
        clip_extractor = ClipExtractor.tiny() if config.clip == TINY else ClipExtractor.from_pretrained(config.clip)
        inception_extractor = (
            InceptionExtractor.tiny()
            if config.inception == TINY
            else InceptionExtractor.from_torchscript(config.inception, device=device)
        )
        lpips_network = (
            LpipsNetwork.tiny()
            if config.lpips_trunk == TINY
            else LpipsNetwork.from_state_dicts(config.lpips_trunk, config.lpips_linear)
        )
        return cls(clip=clip_extractor, inception=inception_extractor, lpips=lpips_network).to(device)

    def to(self, device: str | torch.device) -> MetricSuite:
        self.clip.to(device)
        self.inception.to(device)
        self.lpips.to(device)
        return self
