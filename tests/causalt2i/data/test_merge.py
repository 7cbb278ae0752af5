import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from causalt2i.data.merge import (
    BACKGROUND,
    Canvas,
    bucket_step,
    build_training_canvases,
    merge_subjects,
    nearest_bucket,
    row_sizes,
    sdxl_buckets,
)

SDXL_CANONICAL = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640), (640, 1536)]
COLOURS = [(230, 30, 30), (30, 30, 230), (30, 200, 30), (240, 220, 20), (200, 30, 200), (20, 200, 210)]


def _solid(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def _centre(box):
    left, top, right, bottom = box
    return (left + right) // 2, (top + bottom) // 2


def _rows(canvas: Canvas) -> dict[int, list[int]]:
    """Subject indices per row (keyed by tile top), left to right."""
    rows: dict[int, list[int]] = {}
    for subject, box in sorted(enumerate(canvas.tile_boxes), key=lambda item: (item[1][1], item[1][0])):
        rows.setdefault(box[1], []).append(subject)
    return rows


def test_buckets_at_1024_include_sdxl_canonical_buckets():
    buckets = sdxl_buckets(1024)
    assert set(SDXL_CANONICAL) <= set(buckets)
    assert bucket_step(1024) == 64


@pytest.mark.parametrize("resolution, step", [(64, 16), (128, 16), (512, 32), (832, 32), (1024, 64)])
def test_bucket_sides_areas_and_aspects(resolution, step):
    buckets = sdxl_buckets(resolution)
    assert bucket_step(resolution) == step
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % step == 0 and height % step == 0 and width % 16 == 0 and height % 16 == 0
        assert abs(width * height - resolution**2) <= 0.07 * resolution**2
        assert 0.25 <= width / height <= 4.0
    assert [w / h for w, h in buckets] == sorted(w / h for w, h in buckets)


def test_buckets_at_64_are_exactly_the_tiny_model_set():
    # Sides multiples of 16, area within 7 % of 4096: 16·16·ab with ab ∈ {15, 16}, aspect ≤ 4.
    assert sdxl_buckets(64) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]


@pytest.mark.parametrize(
    "aspect, resolution, expected",
    [
        (1.0, 1024, (1024, 1024)),
        (2.4, 1024, (1536, 640)),  # exactly 1536/640
        (0.5, 1024, (704, 1408)),  # exactly 704/1408
        (0.25, 1024, (512, 2048)),
        (10.0, 1024, (2048, 512)),  # past the widest bucket: clamp to it
        (1.3, 1024, (1152, 896)),  # |ln 1.3 − ln(1152/896)| = 0.011 < |ln 1.3 − ln(1216/896)| = 0.043
        (1.0, 64, (64, 64)),
        (1.2, 64, (64, 64)),  # |ln 1.2| = 0.182 < |ln 1.2 − ln(80/48)| = 0.329
        (2.0, 64, (80, 48)),  # |ln 2 − ln(5/3)| = 0.182 < |ln 2 − ln 4| = 0.693
        (0.3, 64, (32, 128)),  # |ln 0.3 − ln 0.25| = 0.182 < |ln 0.3 − ln 0.6| = 0.693
    ],
)
def test_nearest_bucket_hand_computed(aspect, resolution, expected):
    assert nearest_bucket(aspect, resolution) == expected


@pytest.mark.parametrize("aspect", [0.0, -1.0, math.inf, math.nan])
def test_nearest_bucket_refuses_bad_aspect(aspect):
    with pytest.raises(ValueError, match="aspect"):
        nearest_bucket(aspect, 1024)


def test_resolution_must_be_a_multiple_of_the_side_multiple():
    with pytest.raises(ValueError, match="multiple of 16"):
        sdxl_buckets(100)


@pytest.mark.parametrize("n, expected", [(1, [1]), (2, [2]), (3, [3]), (4, [2, 2]), (5, [3, 2]), (6, [3, 3]), (7, [4, 3]), (8, [4, 4])])
def test_row_sizes(n, expected):
    assert row_sizes(n) == expected


@pytest.mark.parametrize("resolution", [64, 256])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_tiles_keep_aspect_within_one_pixel_and_show_their_subject(n, resolution):
    rng = np.random.default_rng(n * 1000 + resolution)
    sizes = [(int(rng.integers(40, 240)), int(rng.integers(40, 240))) for _ in range(n)]
    images = [_solid(w, h, COLOURS[i]) for i, (w, h) in enumerate(sizes)]
    canvas = merge_subjects(images, resolution, random.Random(n))

    assert canvas.image.size in sdxl_buckets(resolution)
    assert len(canvas.tile_boxes) == n
    pixels = np.asarray(canvas.image)
    covered = np.zeros(pixels.shape[:2], dtype=int)
    for i, ((w, h), box) in enumerate(zip(sizes, canvas.tile_boxes)):
        left, top, right, bottom = box
        assert 0 <= left < right <= canvas.image.width and 0 <= top < bottom <= canvas.image.height
        assert abs((right - left) - (bottom - top) * w / h) <= 1.0, (box, w, h)
        # Box i (subject order) holds subject i's colour; resampling a flat colour is exact within 2.
        assert np.abs(pixels[top:bottom, left:right].astype(int) - COLOURS[i]).max() <= 2
        covered[top:bottom, left:right] += 1
    assert covered.max() == 1  # tiles never overlap
    assert (pixels[covered == 0] == BACKGROUND).all()  # everything else is background


@pytest.mark.parametrize("n, expected_rows", [(1, [1]), (2, [2]), (3, [3]), (4, [2, 2]), (5, [3, 2]), (6, [3, 3])])
def test_layouts(n, expected_rows):
    images = [_solid(100, 100, COLOURS[i]) for i in range(n)]
    canvas = merge_subjects(images, 256, random.Random(0))
    rows = _rows(canvas)
    assert [len(subjects) for subjects in rows.values()] == expected_rows
    heights = {box[3] - box[1] for box in canvas.tile_boxes}
    assert len(heights) == 1  # one common row height
    # Each row is centred: its left and right margins differ by at most 1 px.
    for subjects in rows.values():
        left = canvas.tile_boxes[subjects[0]][0]
        right = canvas.image.width - canvas.tile_boxes[subjects[-1]][2]
        assert abs(left - right) <= 1
    if n == 4:
        assert len({box[0] for box in canvas.tile_boxes}) == 2  # 2 x 2: two columns as well as two rows


def test_one_row_order_is_random_and_covers_every_permutation():
    images = [_solid(100, 100, COLOURS[i]) for i in range(3)]
    orders = Counter()
    for seed in range(60):
        (row,) = _rows(merge_subjects(images, 64, random.Random(seed))).values()
        orders[tuple(row)] += 1
    assert len(orders) == 6  # all 3! orders appear in 60 draws (chance of missing one < 1e-4)


def test_letterbox_pads_instead_of_stretching():
    # One 3:1 tile at 64 px: the nearest bucket is 128x32 (aspect 4), so the tile is padded left and right.
    canvas = merge_subjects([_solid(300, 100, COLOURS[0])], 64, random.Random(0))
    assert canvas.image.size == (128, 32)
    assert canvas.tile_boxes == ((16, 0, 112, 32),)


def test_time_ids_match_the_canvas():
    # Two squares of 100 and 200 px at 64: aspect 2 → bucket 80x48; row height floor(min(48, 80/2)) = 40.
    # The natural scale puts the smaller source at its own height: 100/40 = 2.5 → original (120, 200).
    canvas = merge_subjects([_solid(100, 100, COLOURS[0]), _solid(200, 200, COLOURS[1])], 64, random.Random(0))
    assert canvas.image.size == (80, 48)
    assert canvas.target_size == (48, 80)
    assert canvas.original_size == (120, 200)
    assert canvas.crop_top_left == (0, 0)
    time_ids = canvas.time_ids()
    assert time_ids.dtype == torch.float32 and time_ids.shape == (6,)
    assert time_ids.tolist() == [120.0, 200.0, 0.0, 0.0, 48.0, 80.0]


def test_canvas_refuses_a_target_size_that_is_not_the_image_size():
    with pytest.raises(ValueError, match="target_size"):
        Canvas(image=_solid(80, 48, BACKGROUND), tile_boxes=(), source_indices=(), original_size=(48, 80), target_size=(80, 48))


def test_merge_refuses_no_images():
    with pytest.raises(ValueError, match="images"):
        merge_subjects([], 64, random.Random(0))


def _subject_sets(counts: list[int]) -> list[list[Image.Image]]:
    """Reference j of subject s is a flat colour that encodes (s, j), with its own aspect ratio."""
    return [[_solid(80 + 20 * j, 100, (40 + 60 * s, 30 * j, 90)) for j in range(count)] for s, count in enumerate(counts)]


def test_build_training_canvases_records_the_references_it_used():
    subject_images = _subject_sets([3, 5])
    canvases = build_training_canvases(subject_images, resolution=64, seed=7)
    assert len(canvases) == 3  # K = the fewest references of any subject
    # With K = 3, the 3-reference subject shows each of its references exactly once.
    assert sorted(canvas.source_indices[0] for canvas in canvases) == [0, 1, 2]
    for canvas in canvases:
        pixels = np.asarray(canvas.image).astype(int)
        for subject, (pick, box) in enumerate(zip(canvas.source_indices, canvas.tile_boxes)):
            x, y = _centre(box)
            assert np.abs(pixels[y, x] - (40 + 60 * subject, 30 * pick, 90)).max() <= 2


def test_build_training_canvases_more_than_the_references():
    canvases = build_training_canvases(_subject_sets([2, 3]), resolution=64, seed=1, k=6)
    assert len(canvases) == 6
    first = [canvas.source_indices[0] for canvas in canvases]
    # Drawn without replacement and reshuffled when used up: each pair of canvases uses both references.
    assert all(sorted(first[i : i + 2]) == [0, 1] for i in range(0, 6, 2))


def test_same_seed_same_pixels_different_seed_differs():
    subject_images = _subject_sets([4, 4, 4])

    def fingerprint(seed: int):
        return [(c.image.tobytes(), c.tile_boxes, c.source_indices, c.original_size) for c in build_training_canvases(subject_images, resolution=64, seed=seed)]

    assert fingerprint(3) == fingerprint(3)
    assert fingerprint(3) != fingerprint(4)


@pytest.mark.parametrize("bad, match", [([], "at least one subject"), ([[_solid(64, 64, BACKGROUND)], []], r"subject_images\[1\]")])
def test_build_training_canvases_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        build_training_canvases(bad, resolution=64, seed=0)
    with pytest.raises(ValueError, match="k"):
        build_training_canvases(_subject_sets([2]), resolution=64, seed=0, k=0)
