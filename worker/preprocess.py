"""Decode and preprocess one image: the single function shared by training and serving.

Training, the worker and every engine call `decode_image`, so a model never sees pixels
prepared differently from the ones it was trained on (resize results differ between libraries).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 128
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# Magic numbers of the accepted formats: a file that starts with one is a damaged image, not "not an image".
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM")
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow has its own bomb check; ours runs first, with a reason code, so disable its warning path.
Image.MAX_IMAGE_PIXELS = None
# Only these parsers ever see uploaded bytes (Pillow would otherwise try every plugin it has).
_PARSERS = tuple(sorted(ACCEPTED_FORMATS))
# Other image formats, told by their magic bytes alone (their parsers never run): such an upload is
# an image in a format we do not take ("unsupported_format"), not "not an image".
_OTHER_FORMATS = (
    (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"DDS ", "DDS"), (b"qoif", "QOI"),
    (b"\x01\xda", "SGI"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"BLP1", "BLP"), (b"BLP2", "BLP"),
    (b"\x59\xa6\x6a\x95", "Sun raster"), (b"SIMPLE  =", "FITS"),
)
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last chunk of every complete PNG


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


class ImageRejected(ValueError):
    """The bytes cannot become a model input. Permanent: retrying gives the same answer."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


PREPROCESSING_SPEC = {
    "function": "worker.preprocess.decode_image",
    "size": [IMAGE_SIZE, IMAGE_SIZE],
    "channels": 1,
    "color": "grayscale (Pillow 'L', ITU-R 601-2 luma); alpha composited over white",
    "resize": "Pillow BILINEAR with antialiasing; JPEG draft decode when >=2x larger",
    "scale": "uint8 / 255 -> float32 in [0, 1]",
    "sixteen_bit": "scaled by 1/257 to 8 bit before conversion",
}


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Bytes of a PNG/JPEG/TIFF/WebP/BMP/GIF -> float32 array (128, 128, 1) in [0, 1].

    Raises ImageRejected with a reason code for anything that is not a usable image.
    """
    if not data:
        raise ImageRejected("empty_object", "the object has zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "too_many_bytes",
            f"the object has {len(data)} bytes, over the limit of {limits.max_bytes} "
            "(raise WORKER_MAX_IMAGE_BYTES to accept it)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the decode below decides
            image = Image.open(io.BytesIO(data), formats=_PARSERS)
    except UnidentifiedImageError:
        if data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageRejected("corrupt_image", "the file starts like an image but cannot be read: "
                                "truncated or damaged; upload it again")
        other = _other_image_format(data)
        if other:
            raise ImageRejected(
                "unsupported_format",
                f"format {other} is not accepted (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})",
            )
        raise ImageRejected("not_an_image", f"the bytes are not a {', '.join(_PARSERS)} image")
    except Exception as exc:  # Pillow raises a zoo of types on hostile headers
        raise ImageRejected("corrupt_image", f"cannot read the image header: {exc}")
    if image.format not in ACCEPTED_FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"format {image.format} is not accepted (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})",
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt_image", f"the header declares a {width}x{height} image")
    # Before any pixel is decoded: the header alone decides, so a bomb costs a few header bytes.
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
            "(raise WORKER_MAX_IMAGE_PIXELS to accept it)",
        )
    _check_layout(image, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if image.format == "JPEG" and min(width, height) >= 2 * IMAGE_SIZE:
                image.draft("L", (IMAGE_SIZE, IMAGE_SIZE))
            image.load()
            gray = _to_grayscale(image)
            resized = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"cannot decode the image: {exc}")
    pixels = np.asarray(resized, dtype=np.float32)
    return (pixels * (1.0 / 255.0)).reshape(IMAGE_SIZE, IMAGE_SIZE, 1)


def _other_image_format(data: bytes) -> str | None:
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            return name
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        return "HEIF/AVIF"
    if len(data) > 2 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] in (0, 1):
        return "PCX"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM"
    return None


def _check_layout(image: Image.Image, data: bytes) -> None:
    """Damage Pillow would decode without complaint."""
    if image.format == "PNG" and _PNG_END not in data[-4096:]:
        # Pillow stops after the last IDAT and does not miss the end: a PNG cut short right after
        # its image data would pass as complete.
        raise ImageRejected("corrupt_image", "the PNG has no IEND chunk: the file is truncated; upload it again")


def _to_grayscale(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "L":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.float64)
        if mode == "I" and wide.max(initial=0) <= 255:
            scaled = wide
        else:
            scaled = wide / 257.0
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
    if mode == "F":
        wide = np.asarray(image, dtype=np.float64)
        peak = 1.0 if wide.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(wide * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if mode in ("RGB", "P", "CMYK", "YCbCr", "1", "RGBX", "LAB", "HSV"):
        return image.convert("L")
    raise ImageRejected("unsupported_mode", f"pixel mode {mode} is not supported")
