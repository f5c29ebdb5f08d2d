"""Image bytes -> model input, as the model spec says: the one preprocessing function.

Training, calibration, parity, the worker, /classify and the bench all call `preprocess_image`
(or its two halves, `decode_pixels` and `normalize`), so a model never sees pixels prepared
differently from the ones it was trained or checked on (resize results differ between
libraries: the spec names the interpolation, Pillow does it). Decoding is per image; the
arithmetic (scale, offset, mean, std, layout) is vectorised over whole arrays and batches.

Bad bytes raise ImageRejected with a reason code (empty_object, too_many_bytes, not_an_image,
unsupported_format, corrupt_image, too_many_pixels, unsupported_mode) and a message that says
what to do; the decode limits apply before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelspec.spec import InputSpec, ModelSpec, PreprocessSpec

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


_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def preprocess_image(data: bytes, spec: ModelSpec, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Bytes of a PNG/JPEG/TIFF/WebP/BMP/GIF -> float32 model input of one image, in the spec's
    layout (H, W, C) or (C, H, W). Raises ImageRejected with a reason code."""
    return normalize(decode_pixels(data, spec.input, spec.preprocess, limits), spec)


def decode_pixels(data: bytes, input_spec: InputSpec, preprocess: PreprocessSpec,
                  limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Bytes -> uint8 (height, width, channels) in the spec's colour order, resized as it says."""
    image = _open_checked(data, limits)
    target = (input_spec.width, input_spec.height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resized_size = _resized_size(image.size, target, preprocess)
            if image.format == "JPEG":
                # Reduced-size JPEG decoding (DCT scaling by 1/2, 1/4 or 1/8) when the source has at
                # least twice the pixels kept per side; it never goes below the size asked for.
                if image.size[0] >= 2 * resized_size[0] and image.size[1] >= 2 * resized_size[1]:
                    image.draft("L" if input_spec.color == "gray" else "RGB", resized_size)
            image.load()
            converted = _to_grayscale(image) if input_spec.color == "gray" else _to_rgb(image)
            if converted.size != image.size:  # draft changed the size: recompute against the real one
                resized_size = _resized_size(converted.size, target, preprocess)
            fitted = _resize(converted, resized_size, target, preprocess)
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"cannot decode the image: {exc}")
    pixels = np.asarray(fitted, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if input_spec.color == "bgr":
        pixels = pixels[:, :, ::-1]
    return pixels


def normalize(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 (..., H, W, C) -> float32 model input: * scale + offset, then (x - mean) / std, then
    the layout. Works on one image or a whole batch at once."""
    p = spec.preprocess
    values = pixels.astype(np.float32) * np.float32(p.scale)
    if p.offset:
        values += np.float32(p.offset)
    if any(p.mean):
        values -= np.asarray(p.mean, dtype=np.float32)
    if any(s != 1 for s in p.std):
        values /= np.asarray(p.std, dtype=np.float32)
    if spec.input.layout == "NCHW":
        values = np.moveaxis(values, -1, -3)
    return np.ascontiguousarray(values)


def _open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open the bytes and check everything the header can tell, before any pixel is decoded."""
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
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
            "(raise WORKER_MAX_IMAGE_PIXELS to accept it)",
        )
    _check_layout(image, data)
    return image


def _resized_size(size: tuple[int, int], target: tuple[int, int], p: PreprocessSpec) -> tuple[int, int]:
    """(width, height) the image is resized to before any crop or padding."""
    width, height = size
    if p.resize == "stretch":
        return target
    if p.resize == "shorter_side_crop":
        shorter = p.resize_shorter_to or max(target)
        factor = shorter / min(width, height)
        return (max(shorter, round(width * factor)) if width >= height else shorter,
                max(shorter, round(height * factor)) if height > width else shorter)
    factor = min(target[0] / width, target[1] / height)  # letterbox: fit inside, keep the aspect
    return (min(target[0], max(1, round(width * factor))), min(target[1], max(1, round(height * factor))))


def _resize(image: Image.Image, resized: tuple[int, int], target: tuple[int, int], p: PreprocessSpec) -> Image.Image:
    scaled = image.resize(resized, _RESAMPLING[p.interpolation])
    if p.resize == "stretch":
        return scaled
    if p.resize == "shorter_side_crop":
        left, top = (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2
        return scaled.crop((left, top, left + target[0], top + target[1]))
    fill = p.letterbox_fill if image.mode == "L" else (p.letterbox_fill,) * 3
    canvas = Image.new(image.mode, target, fill)
    canvas.paste(scaled, ((target[0] - resized[0]) // 2, (target[1] - resized[1]) // 2))
    return canvas


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


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F", "L"):
        return _to_grayscale(image).convert("RGB")  # one channel: gray repeated, scaled as for gray
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("P", "CMYK", "YCbCr", "1", "RGBX", "LAB", "HSV"):
        return image.convert("RGB")
    raise ImageRejected("unsupported_mode", f"pixel mode {mode} is not supported")
