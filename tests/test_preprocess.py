"""modelspec.preprocess with the demo CNN's spec: formats, pixel modes, decode limits, hostile and truncated files.

Pure function, no servers: every input is built here in memory.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from modelspec.preprocess import DecodeLimits, ImageRejected, preprocess_image
from modelspec.spec import demo_spec

DEMO = demo_spec()
IMAGE_SIZE = DEMO.input.height


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """The demo CNN's preprocessing: the cases here are about decoding, tests/test_modelspec.py
    covers the rest of the spec."""
    return preprocess_image(data, DEMO, limits)


RNG = np.random.default_rng(7)
GRAY = (RNG.random((150, 210)) * 255).astype(np.uint8)  # not square, not 128: the resize is exercised
RGB = (RNG.random((150, 210, 3)) * 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def rejected(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ImageRejected:
    with pytest.raises(ImageRejected) as raised:
        decode_image(data, limits)
    return raised.value


# Formats and pixel modes -----------------------------------------------------------------------

RGBA = np.dstack([RGB, (RNG.random((150, 210)) * 255).astype(np.uint8)])
CASES = {
    "png-gray": encode(GRAY, "PNG"),
    "png-rgb": encode(RGB, "PNG"),
    "png-rgba": encode(RGBA, "PNG"),
    "png-gray-alpha": encode(Image.fromarray(RGBA).convert("LA"), "PNG"),
    "png-palette": encode(Image.fromarray(RGB).convert("P"), "PNG"),
    "png-bilevel": encode(Image.fromarray(GRAY).convert("1"), "PNG"),
    "png-16bit-gray": encode(GRAY.astype(np.uint16) * 257, "PNG"),
    "jpeg-gray": encode(GRAY, "JPEG", quality=95),
    "jpeg-rgb": encode(RGB, "JPEG", quality=95),
    "jpeg-progressive": encode(RGB, "JPEG", quality=95, progressive=True),
    "jpeg-cmyk": encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
    "tiff-gray": encode(GRAY, "TIFF"),
    "tiff-rgb-lzw": encode(RGB, "TIFF", compression="tiff_lzw"),
    "tiff-rgba-deflate": encode(RGBA, "TIFF", compression="tiff_adobe_deflate"),
    "tiff-16bit-gray-little-endian": tiff(GRAY.astype(np.uint16) * 257, byteorder="<"),
    "tiff-16bit-gray-big-endian": tiff(GRAY.astype(np.uint16) * 257, byteorder=">"),
    "tiff-16bit-rgb": tiff(RGB.astype(np.uint16) * 257, photometric="rgb"),
    "webp-gray-lossless": encode(GRAY, "WEBP", lossless=True),
    "webp-rgb-lossy": encode(RGB, "WEBP", quality=90),
    "webp-rgba-lossless": encode(RGBA, "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_format_and_mode_becomes_one_model_input(name):
    pixels = decode_image(CASES[name])

    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 1) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0.01


def test_lossless_encodings_of_one_gray_image_decode_identically():
    expected = decode_image(CASES["png-gray"])
    same = ["tiff-gray", "webp-gray-lossless", "png-16bit-gray", "tiff-16bit-gray-little-endian",
            "tiff-16bit-gray-big-endian", encode(np.dstack([GRAY] * 3), "PNG")]

    for item in same:
        np.testing.assert_array_equal(decode_image(CASES.get(item, item)), expected, err_msg=str(item)[:40])


def test_sixteen_bit_is_scaled_by_1_over_257_not_clipped():
    full_range = decode_image(encode(np.full((64, 64), 65535, np.uint16), "PNG"))
    mid = decode_image(encode(np.full((64, 64), 128 * 257, np.uint16), "PNG"))

    assert np.all(full_range == 1.0)
    assert np.allclose(mid, 128 / 255)


def test_color_becomes_luma_and_alpha_is_composited_over_white():
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    transparent = np.zeros((32, 32, 4), np.uint8)
    half = np.dstack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 128, np.uint8)])

    assert np.allclose(decode_image(encode(red, "PNG")), round(255 * 299 / 1000) / 255, atol=1 / 255)
    assert np.all(decode_image(encode(transparent, "PNG")) == 1.0)  # nothing drawn: white paper
    assert np.allclose(decode_image(encode(half, "PNG")), 127 / 255, atol=1 / 255)


def test_lossy_encodings_stay_close_to_the_lossless_ones():
    lossless = decode_image(CASES["png-rgb"])

    for name in ("jpeg-rgb", "jpeg-progressive", "jpeg-cmyk", "webp-rgb-lossy"):
        assert np.abs(decode_image(CASES[name]) - lossless).mean() < 0.03, name


def test_training_and_serving_share_the_one_function():
    import modelkit.dataset
    import worker.batch

    assert modelkit.dataset.preprocess_image is preprocess_image
    assert worker.batch.preprocess_image is preprocess_image


# Decode limits and decompression bombs ---------------------------------------------------------

def test_too_many_bytes_is_refused_before_parsing():
    error = rejected(CASES["png-rgb"], DecodeLimits(max_bytes=1000))

    assert error.reason == "too_many_bytes" and "WORKER_MAX_IMAGE_BYTES" in str(error)


@pytest.mark.parametrize("name", ["png-rgb", "jpeg-rgb", "tiff-rgb-lzw", "webp-rgb-lossy"])
def test_the_pixel_limit_applies_to_every_format(name):
    error = rejected(CASES[name], DecodeLimits(max_pixels=150 * 210 - 1))

    assert error.reason == "too_many_pixels" and "150" in str(error) and "WORKER_MAX_IMAGE_PIXELS" in str(error)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(GRAY[:16, :16], "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_header_only(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 64),
               (284, 3, 1, 1)]
    packed = [struct.pack("<HHI", tag, kind, count)
              + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
              for tag, kind, count, value in entries]
    ifd = struct.pack("<H", len(entries)) + b"".join(packed) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 64


def gif_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.fromarray(GRAY[:16, :16]).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(GRAY[:16, :16], "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def webp_lossless_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(GRAY[:16, :16], "WEBP", lossless=True))
    start = data.index(b"VP8L") + 8 + 1  # chunk header, then the 0x2f signature byte
    bits = int.from_bytes(data[start : start + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[start : start + 4] = bits.to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("make, size", [
    (png_header_only, (100_000, 100_000)),
    (jpeg_with_size, (65_000, 65_000)),
    (tiff_header_only, (200_000, 200_000)),
    (gif_with_size, (65_535, 65_535)),
    (bmp_with_size, (100_000, 100_000)),
    (webp_lossless_with_size, (16_384, 16_384)),
], ids=["png", "jpeg", "tiff", "gif", "bmp", "webp"])
def test_a_bomb_sized_header_is_refused_from_the_header_alone(make, size):
    """10^8..10^10 pixels declared in a file of a few hundred bytes: refused in milliseconds, no
    pixel buffer allocated (decoding would take minutes and gigabytes)."""
    data = make(*size)
    assert len(data) < 2000
    started = time.perf_counter()

    error = rejected(data)

    assert time.perf_counter() - started < 0.5
    assert error.reason == "too_many_pixels", error
    assert f"{size[0]}x{size[1]}" in str(error)


# Truncated, damaged and foreign files ----------------------------------------------------------

@pytest.mark.parametrize("name", ["png-rgb", "png-16bit-gray", "jpeg-rgb", "jpeg-progressive", "tiff-rgb-lzw",
                                  "tiff-16bit-gray-big-endian", "webp-rgb-lossy", "webp-rgba-lossless"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99, -12, -1])
def test_a_truncated_file_is_a_corrupt_image(name, keep):
    data = CASES[name]
    cut = data[: int(len(data) * keep)] if keep > 0 else data[:keep]

    error = rejected(cut)

    assert error.reason == "corrupt_image", (name, keep, error)


def test_a_png_cut_right_after_its_image_data_is_refused_too():
    """Pillow alone decodes it: every IDAT is there, only the IEND chunk is missing."""
    data = CASES["png-rgb"]

    assert data.endswith(b"IEND\xaeB`\x82")
    assert rejected(data[:-12]).reason == "corrupt_image"
    assert decode_image(data + b"trailing bytes some tools append").shape == (IMAGE_SIZE, IMAGE_SIZE, 1)


def test_damaged_pixel_data_is_a_corrupt_image():
    data = bytearray(CASES["png-rgb"])
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64  # breaks the zlib stream (and the chunk CRC)

    assert rejected(bytes(data)).reason == "corrupt_image"


@pytest.mark.parametrize("data", [b"%PDF-1.4\n", b"hello, world", b"\x00" * 100, b"PK\x03\x04" + b"\x00" * 60],
                         ids=["pdf", "text", "zeros", "zip"])
def test_bytes_that_are_no_image_at_all(data):
    assert rejected(data).reason == "not_an_image"


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "PPM", "SGI", "QOI", "DDS", "ICNS"])
def test_images_in_other_formats_are_unsupported_and_never_parsed(fmt, monkeypatch):
    """Pillow could read these, but only the accepted formats' parsers ever see uploaded bytes:
    the format is told from its magic bytes alone."""
    from PIL import Image as PillowImage

    data = encode(Image.fromarray(RGB).resize((32, 32)), fmt)
    opened = []
    real_open = PillowImage.open
    monkeypatch.setattr(PillowImage, "open", lambda *a, **k: opened.append(k.get("formats")) or real_open(*a, **k))

    error = rejected(data)

    assert error.reason == "unsupported_format" and "is not accepted" in str(error)
    assert opened and all(formats and set(formats) <= {"PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"}
                          for formats in opened)


def test_an_empty_object_has_its_own_reason():
    assert rejected(b"").reason == "empty_object"


def test_a_tiff_with_an_unreadable_sample_layout_is_refused():
    """16-bit gray + alpha: Pillow has no mode for it."""
    data = tiff(np.dstack([GRAY, GRAY]).astype(np.uint16) * 257, photometric="minisblack", extrasamples=[2])

    assert rejected(data).reason == "corrupt_image"


def test_a_multi_page_tiff_is_read_from_its_first_page():
    pages = np.stack([GRAY, 255 - GRAY])

    np.testing.assert_array_equal(decode_image(tiff(pages)), decode_image(encode(GRAY, "TIFF")))


def test_a_png_text_chunk_bomb_is_refused_quickly():
    """A zTXt chunk that inflates to 200 MB: Pillow stops at its own text limit."""
    data = CASES["png-gray"]
    bomb = _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 200_000_000, 9))
    hostile = data[:33] + bomb + data[33:]  # right after the 8-byte signature and the IHDR chunk
    started = time.perf_counter()

    error = rejected(hostile)

    assert time.perf_counter() - started < 1.0
    assert error.reason == "corrupt_image"
