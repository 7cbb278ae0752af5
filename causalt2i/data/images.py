"""Reference images: load a tenant's photos, or refuse them with an error that names the file.

The same rules apply to a file on disk (`load_reference_image`) and to an upload before it is stored
(`validate_image_bytes`): JPEG, PNG or WebP only (the decoded format, not the suffix); no bigger than
`max_file_bytes`; at most `max_pixels` pixels, checked from the header before any pixel is decoded;
smaller side at least `min_side`; fully decodable. Accepted images come back as RGB with their EXIF
orientation applied and transparency composited over white.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_FILE_BYTES = 50 * 2**20
DEFAULT_MAX_FILES = 32

# Only these plugins may parse an upload: fewer parsers see untrusted bytes. Phone cameras write
# multi-picture JPEGs, which Pillow reports as MPO; they are JPEGs to the user.
_PARSER_FORMATS = ("JPEG", "PNG", "WEBP")
_ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
_WHITE = (255, 255, 255, 255)

# Magic numbers, only to say in the error what a refused file looks like.
_KNOWN_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
    b"\x00\x00\x01\x00": "ICO",
}

# What a damaged file raises while Pillow decodes it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageInputError(ValueError):
    """A reference image that cannot be used. `path` names the file (or upload); `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _looks_like(head: bytes) -> str | None:
    for signature, kind in _KNOWN_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "HEIC/AVIF/MP4"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # Transparent areas become white rather than the black an RGB convert would give them.
        background = Image.new("RGBA", image.size, _WHITE)
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit greyscale: a plain convert would clip everything above 255 to white.
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L").convert("RGB")
    return image.convert("RGB")


def _decode(
    data: bytes,
    name: str | os.PathLike,
    *,
    min_side: int,
    max_pixels: int,
    max_file_bytes: int,
) -> Image.Image:
    if len(data) > max_file_bytes:
        raise ImageInputError(name, f"file is {len(data):,} bytes; the limit is {max_file_bytes:,} bytes")
    if not data:
        raise ImageInputError(name, "file is empty")
    kind = _looks_like(data[:16])
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice that; a warning here is a refusal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_PARSER_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageInputError(name, f"decompression bomb refused: {err}") from None
        except UnidentifiedImageError:
            if kind in ("JPEG", "PNG", "WEBP"):
                raise ImageInputError(name, f"corrupt {kind} file: its header cannot be read") from None
            found = f" (it looks like {kind})" if kind else ""
            raise ImageInputError(name, f"not a JPEG, PNG or WebP image{found}") from None
        except _DECODE_ERRORS as err:
            raise ImageInputError(name, f"corrupt image file: {err}") from None
        if image.format not in _ACCEPTED_FORMATS:
            raise ImageInputError(name, f"format {image.format} is not JPEG, PNG or WebP")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageInputError(
                name, f"{width}x{height} is {width * height:,} pixels; the limit is {max_pixels:,} (decompression bomb?)"
            )
        if min(width, height) < min_side:
            raise ImageInputError(name, f"{width}x{height} is too small: the smaller side must be at least {min_side} px")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageInputError(name, f"decompression bomb refused: {err}") from None
        except _DECODE_ERRORS as err:
            raise ImageInputError(name, f"corrupt or truncated {image.format} file: {err}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (*_DECODE_ERRORS, KeyError, TypeError) as err:
        raise ImageInputError(name, f"malformed EXIF data: {err}") from None
    return _to_rgb(image)


def load_reference_image(
    path: str | os.PathLike,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Image.Image:
    """Load one reference image as RGB, EXIF-oriented; raise `ImageInputError` naming the file if refused."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageInputError(path, "no such file" if not path.exists() else "not a regular file")
        size = path.stat().st_size
        if size > max_file_bytes:
            raise ImageInputError(path, f"file is {size:,} bytes; the limit is {max_file_bytes:,} bytes")
        # Read at most one byte past the limit, so a file that grows after the stat is still refused.
        with open(path, "rb") as handle:
            data = handle.read(max_file_bytes + 1)
    except OSError as err:
        raise ImageInputError(path, f"cannot read file: {err.strerror or err}") from None
    return _decode(data, path, min_side=min_side, max_pixels=max_pixels, max_file_bytes=max_file_bytes)


def validate_image_bytes(
    data: bytes,
    *,
    name: str,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> None:
    """Check an upload by the rules of `load_reference_image` before it is stored; `name` goes in the error."""
    _decode(bytes(data), name, min_side=min_side, max_pixels=max_pixels, max_file_bytes=max_file_bytes)


def load_subject_images(
    paths: Sequence[str | os.PathLike],
    *,
    max_files: int = DEFAULT_MAX_FILES,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> list[Image.Image]:
    """Load every reference image of one subject; refuse an empty list or more than `max_files` files."""
    paths = list(paths)
    if not paths:
        raise ImageInputError("<no files>", "a subject needs at least one reference image")
    if len(paths) > max_files:
        raise ImageInputError(
            paths[max_files], f"too many reference images: {len(paths)} given, at most {max_files} per subject"
        )
    return [
        load_reference_image(path, min_side=min_side, max_pixels=max_pixels, max_file_bytes=max_file_bytes)
        for path in paths
    ]
