"""Merged training images (METHOD.md "Merged images", paper Section III-C).

A training example is one reference image per subject, tiled onto one canvas at a common row height,
fitted into the SDXL aspect bucket nearest the canvas's aspect ratio. The canvas is letterboxed into the
bucket instead of stretched, and each tile is resampled exactly once, straight to its final size, so every
tile keeps its aspect ratio to within half a pixel.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

BACKGROUND = (127, 127, 127)
BUCKET_AREA_TOLERANCE = 0.07  # SDXL's own 1536x640 bucket is 6.25 % below 1024².
MAX_BUCKET_ASPECT = 4.0
# The tiny U-Net halves the latent once and the VAE divides by 8, so tiny canvases need sides % 16 == 0.
DEFAULT_SIDE_MULTIPLE = 16

Box = tuple[int, int, int, int]


def bucket_step(resolution: int, multiple: int = DEFAULT_SIDE_MULTIPLE) -> int:
    """The side granularity of the buckets: the largest multiple of `multiple` that is at most
    max(multiple, resolution // 16) and divides `resolution` (64 at 1024, as in SDXL; 16 at 64)."""
    if multiple <= 0 or resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    step = max(multiple, resolution // 16 // multiple * multiple)
    while resolution % step:
        step -= multiple
    return step


@functools.lru_cache(maxsize=32)
def _buckets(resolution: int, multiple: int, area_tolerance: float, max_aspect: float) -> tuple[tuple[int, int], ...]:
    step = bucket_step(resolution, multiple)
    target = resolution * resolution
    longest_side = math.isqrt(int(target * (1 + area_tolerance) * max_aspect))
    sides = range(step, longest_side + 1, step)
    buckets = [
        (width, height)
        for width in sides
        for height in sides
        if abs(width * height - target) <= area_tolerance * target
        and height <= max_aspect * width
        and width <= max_aspect * height
    ]
    if not buckets:
        raise ValueError(f"no aspect bucket has about {resolution}² pixels with sides a multiple of {step}")
    return tuple(sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0])))


def sdxl_buckets(
    resolution: int,
    *,
    multiple: int = DEFAULT_SIDE_MULTIPLE,
    area_tolerance: float = BUCKET_AREA_TOLERANCE,
    max_aspect: float = MAX_BUCKET_ASPECT,
) -> list[tuple[int, int]]:
    """(width, height) buckets, sorted from tallest to widest: sides are multiples of
    `bucket_step(resolution, multiple)`, the area is within `area_tolerance` of resolution², and the
    aspect ratio lies in [1/max_aspect, max_aspect]. At 1024 this includes SDXL's canonical buckets."""
    return list(_buckets(resolution, multiple, area_tolerance, max_aspect))


def nearest_bucket(aspect: float, resolution: int, *, multiple: int = DEFAULT_SIDE_MULTIPLE) -> tuple[int, int]:
    """The bucket whose width/height is nearest `aspect` in log space (ties: area nearest resolution²)."""
    if not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a positive finite width/height ratio, got {aspect}")
    wanted = math.log(aspect)
    target = resolution * resolution
    return min(
        _buckets(resolution, multiple, BUCKET_AREA_TOLERANCE, MAX_BUCKET_ASPECT),
        # Rounding keeps exact ties (equal log distances on both sides) from being decided by float noise.
        key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - wanted), 9), abs(wh[0] * wh[1] - target), wh),
    )


@dataclass(frozen=True)
class Canvas:
    """One merged training image and the SDXL micro-conditioning that matches it.

    `tile_boxes[i]` is (left, top, right, bottom) of subject i's tile in `image` pixels, in subject order;
    `source_indices[i]` is which reference image of subject i it shows. Sizes are (height, width):
    `original_size` is the letterboxed canvas at its natural scale (row height = the smallest source
    height), `target_size` is the bucket.
    """

    image: Image.Image
    tile_boxes: tuple[Box, ...]
    source_indices: tuple[int, ...]
    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(f"image: mode must be RGB, got {self.image.mode}")
        if self.target_size != (self.image.height, self.image.width):
            raise ValueError(f"target_size: {self.target_size} is not the image's (height, width) {(self.image.height, self.image.width)}")
        if len(self.tile_boxes) != len(self.source_indices):
            raise ValueError(f"source_indices: {len(self.source_indices)} entries for {len(self.tile_boxes)} tiles")

    def time_ids(self) -> torch.Tensor:
        """SDXL `add_time_ids`: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32, shape [6]."""
        # Imported here so that upload validation (causalt2i.data.images) never pulls in torch.
        import torch

        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


def row_sizes(n: int) -> list[int]:
    """Tiles per row: one row for n ≤ 3, else two rows of ceil(n/2) and the rest (2 × 2 for n = 4)."""
    if n < 1:
        raise ValueError(f"need at least one subject, got {n}")
    if n <= 3:
        return [n]
    per_row = math.ceil(n / 2)
    return [per_row, n - per_row]


def merge_subjects(
    images: Sequence[Image.Image],
    resolution: int,
    rng: random.Random,
    *,
    source_indices: Sequence[int] | None = None,
    multiple: int = DEFAULT_SIDE_MULTIPLE,
    background: tuple[int, int, int] = BACKGROUND,
) -> Canvas:
    """Tile one image per subject onto a canvas in the nearest bucket at about resolution² pixels.

    Tiles are placed in an order drawn from `rng` (in every layout, so that no subject is tied to a place),
    scaled to one row height, rows centred; the whole is centred on `background` inside the bucket.
    `source_indices` is recorded in the canvas (default: 0 for each subject).
    """
    count = len(images)
    if count == 0:
        raise ValueError("images: need one image per subject, got none")
    if source_indices is None:
        source_indices = [0] * count
    if len(source_indices) != count:
        raise ValueError(f"source_indices: {len(source_indices)} entries for {count} images")
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    aspects = [image.width / image.height for image in rgb]

    order = list(range(count))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for size in row_sizes(count):
        rows.append(order[: size])
        order = order[size:]

    unit_width = max(sum(aspects[i] for i in row) for row in rows)  # canvas width at row height 1
    bucket_w, bucket_h = nearest_bucket(unit_width / len(rows), resolution, multiple=multiple)

    # Integer row height shared by all tiles, so a tile's width can be rounded from its own aspect ratio.
    row_height = max(1, math.floor(min(bucket_h / len(rows), bucket_w / unit_width)))
    while True:
        widths = [max(1, round(aspect * row_height)) for aspect in aspects]
        if row_height == 1 or max(sum(widths[i] for i in row) for row in rows) <= bucket_w:
            break
        row_height -= 1  # rounding up every tile overflowed the bucket by a pixel or two

    canvas = Image.new("RGB", (bucket_w, bucket_h), background)
    boxes: list[Box | None] = [None] * count
    top = (bucket_h - row_height * len(rows)) // 2
    for row in rows:
        left = (bucket_w - sum(widths[i] for i in row)) // 2
        for i in row:
            tile = rgb[i].resize((widths[i], row_height), Image.Resampling.LANCZOS, reducing_gap=3.0)
            canvas.paste(tile, (left, top))
            boxes[i] = (left, top, left + widths[i], top + row_height)
            left += widths[i]
        top += row_height

    # SDXL's original_size tells the model how much real detail the image holds: at the smallest source
    # height no tile is upsampled, so that is the canvas's natural scale.
    natural_scale = min(image.height for image in rgb) / row_height
    original_size = (round(bucket_h * natural_scale), round(bucket_w * natural_scale))
    return Canvas(
        image=canvas,
        tile_boxes=tuple(boxes),  # type: ignore[arg-type]
        source_indices=tuple(int(i) for i in source_indices),
        original_size=original_size,
        target_size=(bucket_h, bucket_w),
    )


def build_training_canvases(
    subject_images: Sequence[Sequence[Image.Image]],
    *,
    resolution: int,
    seed: int,
    k: int | None = None,
    multiple: int = DEFAULT_SIDE_MULTIPLE,
) -> list[Canvas]:
    """The K merged training images, built once from `random.Random(seed)`.

    Each subject's references are drawn without replacement (reshuffled when used up), so with the
    default K = the fewest references of any subject, every reference of that subject appears once.
    """
    if not subject_images:
        raise ValueError("subject_images: need at least one subject")
    for index, images in enumerate(subject_images):
        if not images:
            raise ValueError(f"subject_images[{index}]: subject has no reference images")
    if k is None:
        k = min(len(images) for images in subject_images)
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")

    rng = random.Random(seed)
    queues: list[list[int]] = [[] for _ in subject_images]

    def draw(subject: int) -> int:
        if not queues[subject]:
            queues[subject] = list(range(len(subject_images[subject])))
            rng.shuffle(queues[subject])
        return queues[subject].pop()

    canvases = []
    for _ in range(k):
        picks = [draw(subject) for subject in range(len(subject_images))]
        chosen = [subject_images[subject][pick] for subject, pick in enumerate(picks)]
        canvases.append(merge_subjects(chosen, resolution, rng, source_indices=picks, multiple=multiple))
    return canvases
