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
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow has its own bomb check; ours runs first, with a reason code, so disable its warning path.
Image.MAX_IMAGE_PIXELS = None


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
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "the bytes are not an image format Pillow can read")
    except Exception as exc:  # Pillow raises a zoo of types on hostile headers
        raise ImageRejected("corrupt_image", f"cannot read the image header: {exc}")
    if image.format not in ACCEPTED_FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"format {image.format} is not accepted (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})",
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
            "(raise WORKER_MAX_IMAGE_PIXELS to accept it)",
        )
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
