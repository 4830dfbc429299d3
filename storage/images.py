"""Decode catalogue photographs into plain 8-bit RGB, refusing anything we cannot trust.

A catalogue holds whatever the studio exported: CMYK JPEGs, 16-bit PNGs, palette GIFs, rotated
phone shots, and the occasional broken upload. The editing code wants one thing (an upright RGB
image), so every conversion happens here, and every refusal is a typed error naming the key and the
reason, with a stable `code` the manifest records so a bad file costs one row, not a run.
"""

from __future__ import annotations

import io
import warnings
from typing import ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.store import ObjectTooLargeError, Store

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecompressionBombError",
    "EmptyImageError",
    "ImageError",
    "MissingPairHalfError",
    "NotAnImageError",
    "PairSizeMismatchError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "decode_image",
    "encode_png",
    "load_image",
]

DEFAULT_MAX_PIXELS = 40_000_000
# No catalogue photo needs more; an object above it is refused from its reported size, unread.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Enough for the header of every format Pillow reads here (a JPEG's EXIF/ICC segments can push its
# size marker further; then the pixel limit is checked after the full read instead).
HEADER_BYTES = 64 * 1024
_WHITE = (255, 255, 255, 255)


class ImageError(Exception):
    """An image we refuse; `code` goes into the manifest's `error_code` column."""

    code: ClassVar[str] = "image_error"

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class EmptyImageError(ImageError):
    code = "empty"


class TruncatedImageError(ImageError):
    code = "truncated"


class NotAnImageError(ImageError):
    code = "not_an_image"


class DecompressionBombError(ImageError):
    code = "too_large"


class UnsupportedImageError(ImageError):
    code = "unsupported"


class PairSizeMismatchError(ImageError):
    code = "pair_size_mismatch"


class MissingPairHalfError(ImageError):
    code = "missing_pair_half"


def decode_image(data: bytes, key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` fully into an upright 8-bit RGB image.

    The size check runs on the header, before any pixel is decompressed, so a 30000x30000 PNG costs
    nothing. Pillow's own guard (`Image.MAX_IMAGE_PIXELS`, warning then error) is turned into the same
    error, so the effective limit is the smaller of the two. Decoding is forced to the end (`load()`),
    because Pillow otherwise opens lazily and a truncated file would only fail later, inside a model,
    with no key attached.
    """
    if not data:
        raise EmptyImageError(key, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(key, f"refused by Pillow's decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(key, f"not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImageError(key, f"unreadable image header: {exc}") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise DecompressionBombError(
            key, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise UnsupportedImageError(key, f"image has no pixels ({width}x{height})")
    fmt = img.format
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise TruncatedImageError(key, f"truncated or corrupt {fmt} data: {exc}") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        raise UnsupportedImageError(key, f"unreadable EXIF orientation: {exc}") from exc
    return _to_rgb(img, key)


def _to_rgb(img: Image.Image, key: str) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparency is composited on white, as shop pages show it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(_high_bit_depth_to_uint8(img), mode="L").convert("RGB")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA", "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImageError(key, f"cannot convert mode {mode} to RGB: {exc}") from exc


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale 16/32-bit integer and float greyscale to 0..255.

    Integer images are taken as 16-bit (that is what PNG and TIFF store in these modes); float
    images as 0..1 when their maximum is at most 1, else as 0..255. Values outside are clipped.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.nan_to_num(arr * scale) + 0.5, 0, 255).astype(np.uint8)


def encode_png(img: Image.Image) -> bytes:
    """Lossless bytes for edited outputs, so QC and review see exactly what was computed."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_image(
    store: Store, key: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> Image.Image:
    """Read and decode `key`; a missing object raises the store's `NotFoundError`.

    The object's size and its header come first: an object over `max_bytes`, or one whose header
    announces more than `max_pixels`, is refused after reading at most `HEADER_BYTES`.
    """
    head, size = store.read_head(key, HEADER_BYTES)
    if size > max_bytes:
        raise DecompressionBombError(key, f"{size} bytes exceeds the limit of {max_bytes} bytes")
    if len(head) >= size:
        data = head
    else:
        _check_header(head, key, max_pixels)
        try:
            data = store.get_bytes(key, max_bytes=max_bytes)
        except ObjectTooLargeError as exc:  # replaced by a larger object since the size was read
            raise DecompressionBombError(key, str(exc)) from exc
    return decode_image(data, key, max_pixels=max_pixels)


def _check_header(head: bytes, key: str, max_pixels: int) -> None:
    """Refuse an image whose header (in the first bytes) announces more pixels than allowed.

    Only a refusal counts here: a header Pillow cannot read from the first bytes alone is judged by
    `decode_image` after the full (byte-limited) read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(head)).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(key, f"refused by Pillow's decompression-bomb guard: {exc}") from exc
    except Exception:  # noqa: BLE001 - partial data; decode_image gives the real verdict
        return
    if width * height > max_pixels:
        raise DecompressionBombError(
            key, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
