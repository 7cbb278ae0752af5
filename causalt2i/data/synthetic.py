"""Synthetic subjects for the demo and the tests: procedural, visibly distinct, fully deterministic.

Subject i is always the same thing (a shape, a colour and a texture, e.g. a red striped circle). Its
reference images differ in position, scale, rotation and background, like photos of one object do. The
seed only changes those per-image variations.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from causalt2i.data.images import DEFAULT_MIN_SIDE
from causalt2i.atomic import atomic_write_bytes, atomic_write_text
from causalt2i.spec import MAX_SUBJECTS, load_spec, parse_spec

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
COLOURS = (
    (215, 35, 35),  # red
    (35, 80, 215),  # blue
    (30, 160, 55),  # green
    (240, 195, 20),  # yellow
    (195, 40, 195),  # magenta
    (25, 185, 200),  # cyan
    (240, 120, 15),  # orange
    (110, 50, 170),  # purple
)
TEXTURES = ("stripes", "dots", "checker")
CLASS_WORDS = ("cat", "dog", "teapot", "toy", "vase", "backpack", "clock", "robot")
TOKENS = ("<s1>", "<v1>", "<q1>", "<r1>", "<t1>", "<u1>", "<w1>", "<x1>")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SPEC_FORMATS = ("png", "jpg")
_SUPERSAMPLE = 2  # shapes are drawn at twice the size and downsampled, for anti-aliased edges


@dataclass
class SyntheticSubject:
    token: str
    class_word: str
    image_paths: list[Path] = field(default_factory=list)


def _background(size: int, rng: np.random.Generator, image_index: int) -> np.ndarray:
    """A light, nearly grey background (gradient or noise), so the subject's colour dominates its image."""
    greys = rng.uniform(150, 225, size=(2, 1))
    low, high = greys + rng.uniform(-18, 18, size=(2, 3))
    if image_index % 2 == 0:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle))
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        pixels = low + (high - low) * ramp[..., None]
    else:
        pixels = low + rng.normal(0.0, 14.0, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_points(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    def polygon(corners: int, start: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / corners),
                cy + radius * radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / corners),
            )
            for k in range(corners)
        ]

    if shape == "square":
        return polygon(4, math.pi / 4)
    if shape == "triangle":
        return polygon(3, -math.pi / 2)
    if shape == "star":
        return polygon(10, -math.pi / 2, (1.0, 0.45))
    if shape == "hexagon":
        return polygon(6, 0.0)
    if shape == "diamond":
        return [(cx, cy - radius), (cx + 0.6 * radius, cy), (cx, cy + radius), (cx - 0.6 * radius, cy)]
    if shape == "cross":
        a, b = radius, 0.35 * radius
        outline = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        return [(cx + x, cy + y) for x, y in outline]
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        if shape == "ring":
            inner = 0.5 * radius
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_shape_points(shape, cx, cy, radius), fill=255)
    return mask


def _texture(texture: str, size: int, cx: float, cy: float, period: float) -> np.ndarray:
    """True where the texture's darker colour goes, in the subject's own frame (it rotates with it)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xs - cx) / period, (ys - cy) / period
    if texture == "stripes":
        return np.floor(u).astype(int) % 2 == 0
    if texture == "checker":
        return (np.floor(u).astype(int) + np.floor(v).astype(int)) % 2 == 0
    if texture == "dots":
        return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.3**2
    raise ValueError(f"unknown texture {texture!r}")


def render_subject_image(subject_index: int, image_index: int, *, size: int = 128, seed: int = 0) -> Image.Image:
    """Reference image `image_index` of synthetic subject `subject_index` (RGB, size × size)."""
    if not 0 <= subject_index < len(SHAPES):
        raise ValueError(f"subject_index must be in [0, {len(SHAPES)}), got {subject_index}")
    rng = np.random.default_rng((seed, subject_index, image_index))
    shape, colour = SHAPES[subject_index], np.array(COLOURS[subject_index], dtype=np.float64)
    texture = TEXTURES[subject_index % len(TEXTURES)]

    background = Image.fromarray(_background(size, rng, image_index), "RGB").convert("RGBA")
    big = size * _SUPERSAMPLE
    radius = big * rng.uniform(0.27, 0.36)
    cx = big / 2 + big * rng.uniform(-0.1, 0.1)
    cy = big / 2 + big * rng.uniform(-0.1, 0.1)
    angle = rng.uniform(-25.0, 25.0)

    dark = _texture(texture, big, cx, cy, period=radius / 2.5)
    layer = np.empty((big, big, 4), dtype=np.uint8)
    layer[..., :3] = np.where(dark[..., None], colour * 0.55, colour).astype(np.uint8)
    layer[..., 3] = np.asarray(_shape_mask(shape, big, cx, cy, radius))
    subject = Image.fromarray(layer, "RGBA").rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
    subject = subject.resize((size, size), Image.Resampling.LANCZOS)
    background.alpha_composite(subject)
    return background.convert("RGB")


def _encode(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    fmt = _PIL_FORMATS[suffix]
    options = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _check_request(n_subjects: int, images_per_subject: int, size: int, formats: tuple[str, ...]) -> list[str]:
    """Validate the arguments of `make_synthetic_subjects`; return the file suffixes to cycle through."""
    if not 1 <= n_subjects <= min(len(SHAPES), MAX_SUBJECTS):
        raise ValueError(f"n_subjects must be in [1, {min(len(SHAPES), MAX_SUBJECTS)}], got {n_subjects}")
    if images_per_subject < 1:
        raise ValueError(f"images_per_subject must be at least 1, got {images_per_subject}")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    suffixes = [fmt.lower().lstrip(".") for fmt in formats]
    if not suffixes or any(fmt not in _PIL_FORMATS for fmt in suffixes):
        raise ValueError(f"formats must be a non-empty choice of {sorted(_PIL_FORMATS)}, got {list(formats)}")
    return suffixes


def _relative_image_path(subject_index: int, image_index: int, suffix: str) -> str:
    return f"{CLASS_WORDS[subject_index]}/{image_index:02d}.{suffix}"


def make_synthetic_subjects(
    out_dir: str | os.PathLike,
    *,
    n_subjects: int = 2,
    images_per_subject: int = 4,
    size: int = 128,
    seed: int = 0,
    formats: tuple[str, ...] = ("png", "jpg"),
) -> list[SyntheticSubject]:
    """Write `images_per_subject` files per subject to out_dir/<class_word>/NN.<fmt>, cycling `formats`."""
    suffixes = _check_request(n_subjects, images_per_subject, size, formats)
    out_dir = Path(out_dir)
    subjects = []
    for subject_index in range(n_subjects):
        subject = SyntheticSubject(token=TOKENS[subject_index], class_word=CLASS_WORDS[subject_index])
        for image_index in range(images_per_subject):
            suffix = suffixes[image_index % len(suffixes)]
            path = out_dir / _relative_image_path(subject_index, image_index, suffix)
            image = render_subject_image(subject_index, image_index, size=size, seed=seed)
            atomic_write_bytes(path, _encode(image, suffix))
            subject.image_paths.append(path)
        subjects.append(subject)
    return subjects


def write_synthetic_spec(
    out_dir: str | os.PathLike,
    *,
    tenant: str = "demo",
    name: str = "synthetic",
    base_model: str = "tiny",
    resolution: int = 64,
    steps: int | None = 20,
    n_subjects: int = 2,
    images_per_subject: int = 4,
    size: int = 128,
    seed: int = 0,
    gpus_per_worker: float | None = None,
) -> Path:
    """Write synthetic subjects and out_dir/spec.yaml (a `TuningSpec`, image paths relative to it).

    `steps=None` leaves the spec's default (500 per subject); `gpus_per_worker=None` leaves the
    spec's default resources. The spec is validated before any file is written.
    """
    suffixes = _check_request(n_subjects, images_per_subject, size, _SPEC_FORMATS)
    if size < DEFAULT_MIN_SIDE:
        raise ValueError(f"size must be at least {DEFAULT_MIN_SIDE} px, the smallest reference image a tune accepts; got {size}")
    out_dir = Path(out_dir)
    data: dict = {
        "tenant": tenant,
        "name": name,
        "base_model": base_model,
        "subjects": [
            {
                "token": TOKENS[i],
                "class_word": CLASS_WORDS[i],
                "images": [_relative_image_path(i, j, suffixes[j % len(suffixes)]) for j in range(images_per_subject)],
            }
            for i in range(n_subjects)
        ],
        "train": {"resolution": resolution, "seed": seed},
    }
    if steps is not None:
        data["train"]["steps"] = steps
    if gpus_per_worker is not None:
        data["resources"] = {"gpus_per_worker": gpus_per_worker}
        if gpus_per_worker == 0:
            # A CPU-only spec for this machine: the default 4 CPUs per worker would never be placed on 2 cores.
            data["resources"]["cpus_per_worker"] = 1
    parse_spec(data, base_dir=out_dir, check_files=False)  # a bad argument fails here, before any write

    make_synthetic_subjects(
        out_dir, n_subjects=n_subjects, images_per_subject=images_per_subject, size=size, seed=seed, formats=_SPEC_FORMATS
    )
    spec_path = out_dir / "spec.yaml"
    atomic_write_text(spec_path, yaml.safe_dump(data, sort_keys=False))
    load_spec(spec_path)  # the file on disk round-trips, and every image it names exists
    return spec_path
