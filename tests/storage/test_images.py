"""A corpus of awkward and broken inputs, generated here; each gets its named error or the right pixels."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from storage.images import (
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    MissingPairHalfError,
    NotAnImageError,
    PairSizeMismatchError,
    TruncatedImageError,
    decode_image,
    encode_png,
    load_image,
)
from storage.layout import ExemplarPair, list_exemplar_pairs, load_pair
from storage.store import InvalidKeyError


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG header claiming a huge size, with a tiny IDAT: costs a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg() -> bytes:
    img = _noise((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _save(img, "JPEG", exif=exif)


def _rgb(
    expected_size: tuple[int, int] | None = None, pixel: tuple[tuple[int, int], tuple, int] | None = None
):
    """A checker: the result is RGB 8-bit, optionally of a size, optionally with a pixel near a colour."""

    def check(img: Image.Image) -> None:
        assert img.mode == "RGB"
        if expected_size:
            assert img.size == expected_size
        if pixel:
            xy, colour, tol = pixel
            got = img.getpixel(xy)
            assert all(abs(g - c) <= tol for g, c in zip(got, colour, strict=True)), (got, colour)

    return check


def _corpus() -> dict[str, tuple[bytes, type[ImageError] | Callable[[Image.Image], None]]]:
    jpeg = _save(_noise((128, 96)), "JPEG", quality=90)
    png = _save(_noise((128, 96)), "PNG")
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    la = Image.new("LA", (10, 10), (40, 255))
    la.putpixel((0, 0), (0, 0))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 1
    sixteen = Image.fromarray(np.full((6, 7), 32896, dtype=np.uint16))
    floats = Image.fromarray(np.full((5, 5), 0.5, dtype=np.float32), mode="F")
    return {
        "zero_byte.jpg": (b"", EmptyImageError),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], TruncatedImageError),
        "truncated.png": (png[: len(png) // 2], TruncatedImageError),
        "text_named.jpg": (b"this is a note, not a photo\n" * 20, NotAnImageError),
        "page.html.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", NotAnImageError),
        "random_bytes.png": (np.random.default_rng(1).bytes(4096), NotAnImageError),
        "bomb_30000x30000.png": (_bomb_png(30000, 30000), DecompressionBombError),
        "bomb_under_pillow_limit.png": (_bomb_png(8000, 6000), DecompressionBombError),
        "cmyk_red.jpg": (
            _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
            _rgb((16, 16), ((8, 8), (255, 0, 0), 12)),
        ),
        "gray16.png": (_save(sixteen, "PNG"), _rgb((7, 6), ((0, 0), (128, 128, 128), 1))),
        "float.tiff": (_save(floats, "TIFF"), _rgb((5, 5), ((2, 2), (128, 128, 128), 1))),
        "palette.png": (_save(palette, "PNG"), _rgb((8, 8), ((3, 3), (10, 200, 30), 0))),
        "palette_transparent.png": (
            _save(palette_transparent, "PNG"),
            _rgb((8, 8), ((3, 3), (255, 255, 255), 0)),
        ),
        "rgba_clear_corner.png": (_save(rgba, "PNG"), _rgb((10, 10), ((0, 0), (255, 255, 255), 0))),
        "rgba_opaque.png": (_save(rgba, "PNG"), _rgb((10, 10), ((5, 5), (255, 0, 0), 0))),
        "la.png": (_save(la, "PNG"), _rgb((10, 10), ((0, 0), (255, 255, 255), 0))),
        "la_opaque.png": (_save(la, "PNG"), _rgb((10, 10), ((4, 4), (40, 40, 40), 0))),
        "gray.jpg": (
            _save(Image.new("L", (9, 9), 77), "JPEG", quality=100),
            _rgb((9, 9), ((4, 4), (77, 77, 77), 1)),
        ),
        "bilevel.png": (_save(Image.new("1", (9, 9), 1), "PNG"), _rgb((9, 9), ((4, 4), (255, 255, 255), 0))),
        "exif_rotated.jpg": (_exif_rotated_jpeg(), _rgb((40, 80))),
        "good.jpg": (jpeg, _rgb((128, 96))),
        "good.webp": (_save(_noise((20, 10)), "WEBP", lossless=True), _rgb((20, 10))),
    }


CORPUS = _corpus()


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_item_gets_its_named_error_or_right_pixels(name):
    data, expected = CORPUS[name]
    key = f"catalogue/bad/{name}"
    if isinstance(expected, type):
        with pytest.raises(expected) as info:
            decode_image(data, key)
        assert info.value.key == key and key in str(info.value)
        assert info.value.reason and info.value.code == expected.code
    else:
        expected(decode_image(data, key))


def test_error_codes_are_the_manifest_vocabulary():
    codes = {cls.code for cls in ImageError.__subclasses__()}
    assert codes == {
        "empty",
        "truncated",
        "not_an_image",
        "too_large",
        "unsupported",
        "pair_size_mismatch",
        "missing_pair_half",
    }


def test_max_pixels_is_per_call():
    data = _save(_noise((100, 100)), "PNG")
    assert decode_image(data, "k", max_pixels=10_000).size == (100, 100)
    with pytest.raises(DecompressionBombError, match="10000 pixels exceeds the limit of 9999"):
        decode_image(data, "k", max_pixels=9_999)


def test_pillow_bomb_warning_is_refused_even_with_a_higher_limit():
    # 12000x10000 is above Pillow's warning threshold (~89 Mpx) but below its hard error.
    with pytest.raises(DecompressionBombError, match="Pillow"):
        decode_image(_bomb_png(12000, 10000), "k", max_pixels=10**9)


def test_exif_rotation_moves_pixels_not_just_size():
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_save(img, "PNG", exif=exif), "k")
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 255, 255)  # rotated 90 CW: top-left goes to top-right


def test_encode_png_is_lossless():
    img = _noise((33, 17), seed=5)
    assert np.array_equal(np.asarray(decode_image(encode_png(img), "k")), np.asarray(img))


@pytest.mark.parametrize(
    "key", ["../outside.jpg", "exemplars/../../etc/passwd", "cat/\x1bimg.jpg", "cat/img\x7f.jpg"]
)
def test_path_like_and_control_char_keys_are_refused(store, key):
    with pytest.raises(InvalidKeyError, match="invalid key"):
        load_image(store, key)


def test_pair_size_mismatch_names_the_pair(store):
    store.put_bytes("exemplars/relight/p1/before.png", _save(_noise((32, 32)), "PNG"))
    store.put_bytes("exemplars/relight/p1/after.png", _save(_noise((32, 30)), "PNG"))
    (pair,), problems = list_exemplar_pairs(store, "relight")
    assert problems == []
    with pytest.raises(PairSizeMismatchError, match="relight/p1: before is 32x32, after is 32x30"):
        load_pair(store, pair)


def test_missing_after_image_is_reported_and_refused(store):
    store.put_bytes("exemplars/relight/p2/before.jpg", _save(_noise(), "JPEG"))
    pairs, problems = list_exemplar_pairs(store, "relight")
    assert pairs == []
    assert [(p.key, p.code) for p in problems] == [("exemplars/relight/p2/before.jpg", "missing_pair_half")]
    ghost = ExemplarPair("relight", "p2", "exemplars/relight/p2/before.jpg", "exemplars/relight/p2/after.jpg")
    with pytest.raises(MissingPairHalfError) as info:
        load_pair(store, ghost)
    assert info.value.key == "exemplars/relight/p2/after.jpg"


class _CountingStore:
    """Wraps a store and records how many bytes each read asked for (None: the whole object)."""

    def __init__(self, store):
        self.store, self.full_reads, self.head_reads = store, [], []

    def get_bytes(self, key, max_bytes=None):
        self.full_reads.append(key)
        return self.store.get_bytes(key, max_bytes=max_bytes)

    def read_head(self, key, length):
        self.head_reads.append(length)
        return self.store.read_head(key, length)


def test_oversized_header_or_object_is_refused_before_the_object_is_read(store):
    # A header claiming 100000 x 100000 pixels, padded to 1 MiB: only the first bytes may be read.
    store.put_bytes("catalogue/bomb.png", _bomb_png(100_000, 100_000) + b"\0" * (1024 * 1024))
    counting = _CountingStore(store)
    with pytest.raises(DecompressionBombError, match="exceeds the limit|decompression-bomb"):
        load_image(counting, "catalogue/bomb.png")
    assert counting.full_reads == [] and max(counting.head_reads) <= 64 * 1024
    # An object over the byte limit is refused from its size alone.
    photo = _save(_noise((200, 200)), "PNG")
    store.put_bytes("catalogue/photo.png", photo)
    counting = _CountingStore(store)
    with pytest.raises(DecompressionBombError, match=f"{len(photo)} bytes exceeds the limit of 1000 bytes"):
        load_image(counting, "catalogue/photo.png", max_bytes=1000)
    assert counting.full_reads == []
    assert load_image(store, "catalogue/photo.png").size == (200, 200)
