import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalt2i.data.images import (
    ImageInputError,
    load_reference_image,
    load_subject_images,
    validate_image_bytes,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(path: Path, image: Image.Image, fmt: str, **options) -> Path:
    image.save(path, format=fmt, **options)
    return path


def _two_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels, "RGB")


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but which holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _refusal(path: Path, **limits) -> ImageInputError:
    with pytest.raises(ImageInputError) as caught:
        load_reference_image(path, **limits)
    err = caught.value
    assert err.path == str(path)
    assert str(path) in str(err)  # the message names the file
    return err


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_accepted_formats_load_as_rgb_of_the_same_size(tmp_path, fmt, suffix):
    path = _save(tmp_path / f"ok.{suffix}", _two_halves(96, 72), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    image = load_reference_image(path)
    assert image.mode == "RGB"
    assert image.size == (96, 72)
    # Lossy formats: colours within 40/255 of the source in the middle of each half.
    assert np.abs(np.subtract(image.getpixel((20, 36)), RED)).max() <= 40
    assert np.abs(np.subtract(image.getpixel((75, 36)), BLUE)).max() <= 40


def test_exif_orientation_6_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display needs a 90° clockwise rotation
    path = _save(tmp_path / "rotated.jpg", _two_halves(96, 64), "JPEG", quality=95, exif=exif)
    image = load_reference_image(path)
    assert image.size == (64, 96)
    # A clockwise turn moves the left (red) half to the top.
    assert np.abs(np.subtract(image.getpixel((32, 15)), RED)).max() <= 40
    assert np.abs(np.subtract(image.getpixel((32, 80)), BLUE)).max() <= 40


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_over_white(tmp_path, mode):
    rgba = np.zeros((64, 80, 4), dtype=np.uint8)
    rgba[:, :40] = (255, 0, 0, 255)  # opaque red on the left, fully transparent (black) on the right
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        black_index = image.getpixel((70, 10))
        image.info["transparency"] = black_index
    path = _save(tmp_path / f"alpha_{mode}.png", image, "PNG", **({"transparency": image.info["transparency"]} if mode == "P" else {}))
    loaded = load_reference_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((70, 10)) == WHITE
    expected_left = (76, 76, 76) if mode == "LA" else RED  # LA keeps only the grey level of red
    assert loaded.getpixel((10, 10)) == expected_left


def test_missing_file_is_refused(tmp_path):
    assert "no such file" in _refusal(tmp_path / "absent.png").reason


def test_text_file_named_png_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 10)
    assert "not a JPEG, PNG or WebP" in _refusal(path).reason


@pytest.mark.parametrize("fmt, looks_like", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_image_formats_are_refused_even_with_an_accepted_suffix(tmp_path, fmt, looks_like):
    path = _save(tmp_path / "disguised.png", _two_halves(96, 96), fmt)
    reason = _refusal(path).reason
    assert "not a JPEG, PNG or WebP" in reason and looks_like in reason


def test_corrupt_png_is_refused(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert "corrupt" in _refusal(path).reason


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_is_refused(tmp_path, fmt, suffix):
    buffer = io.BytesIO()
    _noise(128, 128).save(buffer, format=fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated" in _refusal(path).reason


@pytest.mark.parametrize("size", [(100, 40), (40, 100), (63, 63)])
def test_image_smaller_than_min_side_is_refused(tmp_path, size):
    path = _save(tmp_path / "small.png", _two_halves(*size), "PNG")
    assert "too small" in _refusal(path).reason


def test_image_exactly_min_side_is_accepted(tmp_path):
    path = _save(tmp_path / "edge.png", _two_halves(64, 64), "PNG")
    assert load_reference_image(path).size == (64, 64)


def test_pixel_count_is_checked_from_the_header_before_decoding(tmp_path):
    # 8000 x 8000 = 64M pixels: above our 40M limit, below Pillow's own bomb limit, and with no pixel
    # data at all. A refusal that speaks of pixels (not truncation) proves the header check came first.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(8000, 8000))
    reason = _refusal(path).reason
    assert "64,000,000 pixels" in reason and "truncated" not in reason


def test_pillow_decompression_bomb_error_becomes_image_input_error(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # far past Pillow's own limit
    assert "decompression bomb" in _refusal(path).reason


def test_real_image_above_max_pixels_is_refused(tmp_path):
    path = _save(tmp_path / "big.png", _two_halves(200, 200), "PNG")
    assert "40,000 pixels" in _refusal(path, max_pixels=10_000).reason
    assert load_reference_image(path, max_pixels=40_000).size == (200, 200)


def test_file_bigger_than_max_file_bytes_is_refused(tmp_path):
    path = _save(tmp_path / "heavy.png", _noise(96, 96), "PNG")
    assert "bytes" in _refusal(path, max_file_bytes=1000).reason


def test_too_many_files_names_the_first_one_past_the_limit(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", _two_halves(64, 64), "PNG") for i in range(3)]
    with pytest.raises(ImageInputError) as caught:
        load_subject_images(paths, max_files=2)
    assert caught.value.path == str(paths[2])
    assert "too many reference images: 3 given, at most 2" in str(caught.value)
    assert [image.size for image in load_subject_images(paths, max_files=3)] == [(64, 64)] * 3


def test_load_subject_images_refuses_an_empty_list():
    with pytest.raises(ImageInputError, match="at least one"):
        load_subject_images([])


def test_load_subject_images_passes_limits_and_names_the_bad_file(tmp_path):
    good = _save(tmp_path / "good.png", _two_halves(96, 96), "PNG")
    small = _save(tmp_path / "small.png", _two_halves(70, 70), "PNG")
    with pytest.raises(ImageInputError) as caught:
        load_subject_images([good, small], min_side=80)
    assert caught.value.path == str(small)


def test_validate_image_bytes_applies_the_same_rules():
    buffer = io.BytesIO()
    _two_halves(96, 96).save(buffer, format="PNG")
    validate_image_bytes(buffer.getvalue(), name="upload.png")  # accepted: no exception

    cases = [
        (buffer.getvalue()[:200], "truncated"),
        (b"GIF89a" + b"\x00" * 100, "GIF"),
        (_png_header_only(8000, 8000), "pixels"),
        (b"", "empty"),
    ]
    for data, expected in cases:
        with pytest.raises(ImageInputError) as caught:
            validate_image_bytes(data, name="subjects.0.images[1]")
        assert caught.value.path == "subjects.0.images[1]"
        assert expected in caught.value.reason, (expected, caught.value.reason)
    with pytest.raises(ImageInputError, match="limit is 100 bytes"):
        validate_image_bytes(buffer.getvalue(), name="upload.png", max_file_bytes=100)
    with pytest.raises(ImageInputError, match="too small"):
        validate_image_bytes(buffer.getvalue(), name="upload.png", min_side=128)
