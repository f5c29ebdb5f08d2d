"""A corpus of bad (and awkward-but-valid) uploads, each with the reason code it must end with."""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import numpy as np
from PIL import Image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(size=(64, 64), mode="L") -> Image.Image:
    rng = np.random.default_rng(7)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = (rng.random((size[1], size[0], channels)) * 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(), mode=mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels, with almost no data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b""))


def bad_inputs() -> list[tuple[str, bytes, str]]:
    """(object name, bytes, expected reason) — at least 20 kinds of input that must not become results."""
    png = _encode(_noise(), "PNG")
    jpeg = _encode(_noise(mode="RGB"), "JPEG")
    corrupt_png = bytearray(png)
    corrupt_png[60:200] = b"\x00" * 140
    return [
        ("empty.png", b"", "empty_object"),
        ("text.png", b"hello, this is not an image\n" * 10, "not_an_image"),
        ("report.pdf", b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", "not_an_image"),
        ("page.html", b"<!doctype html><html><body>hi</body></html>", "not_an_image"),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not_an_image"),
        ("archive.zip", b"PK\x03\x04" + b"\x00" * 100, "not_an_image"),
        ("image.png.gz", gzip.compress(png), "not_an_image"),
        ("random.bin", np.random.default_rng(3).bytes(4096), "not_an_image"),
        ("program.exe", b"MZ\x90\x00" + b"\x00" * 200, "not_an_image"),
        ("png-signature-only.png", b"\x89PNG\r\n\x1a\n", "corrupt_image"),
        ("truncated.png", png[: len(png) // 2], "corrupt_image"),
        ("corrupt-data.png", bytes(corrupt_png), "corrupt_image"),
        ("truncated.jpg", jpeg[: len(jpeg) // 3], "corrupt_image"),
        ("jpeg-header-only.jpg", jpeg[:20], "corrupt_image"),
        ("truncated.tiff", _encode(_noise(), "TIFF")[:100], "corrupt_image"),
        ("truncated.webp", _encode(_noise(), "WEBP")[:40], "corrupt_image"),
        ("bomb.png", png_bomb(), "too_many_pixels"),
        ("wide-bomb.png", png_bomb(1_000_000, 100), "too_many_pixels"),
        ("icon.ico", _encode(_noise((32, 32)), "ICO"), "unsupported_format"),
        ("photoshop.psd", b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 64, 64, 8, 1) + b"\x00" * 64,
         "unsupported_format"),
        ("pcx-image.pcx", _encode(_noise(), "PCX"), "unsupported_format"),
        ("huge-bytes.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * (1024 * 1024 + 10), "too_many_bytes"),
    ]


# Awkward but valid: these must become result rows.
def awkward_valid_inputs() -> list[tuple[str, bytes]]:
    sixteen = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    return [
        ("gray16.png", _encode(sixteen, "PNG")),
        ("rgba.png", _encode(_noise(mode="RGBA"), "PNG")),
        ("palette.gif", _encode(_noise(mode="RGB").convert("P"), "GIF")),
        ("cmyk.jpg", _encode(_noise(mode="RGB").convert("CMYK"), "JPEG")),
        ("tiny-1x1.png", _encode(Image.new("L", (1, 1), 128), "PNG")),
        ("large-2000.jpg", _encode(Image.linear_gradient("L").resize((2000, 1500)).convert("RGB"), "JPEG")),
        ("lossless.webp", _encode(_noise(mode="RGB"), "WEBP", lossless=True)),
        ("multi.tiff", _encode(_noise(), "TIFF")),
        ("name with spaces & ünïcode #1.png", _encode(_noise(), "PNG")),
        ("../../etc/passwd.png", _encode(_noise(), "PNG")),
    ]
