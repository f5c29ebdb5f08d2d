"""A Hugging Face image processor's `preprocessor_config.json` -> the spec's preprocessing.

Many published models carry one. Its resize, crop, rescale and normalize keys map onto the
spec's fixed order (resize, crop, scale and offset, mean and std); keys that change pixels in a
way the spec cannot express are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any

from modelspec.errors import SpecError
from modelspec.spec import PreprocessSpec

# PIL.Image.Resampling values, as the configs store them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_UNSUPPORTED = {"do_pad", "do_reduce_labels", "do_flip_channel_order", "do_thumbnail", "do_align_long_axis"}


def preprocess_from_hf(config: dict[str, Any]) -> tuple[PreprocessSpec, int, int]:
    """(preprocessing, input height, input width) described by an image processor config."""
    active = sorted(key for key in _UNSUPPORTED if config.get(key))
    if active:
        raise SpecError(f"preprocessor_config.json sets {', '.join(active)}, which the model spec cannot express")
    interpolation = _RESAMPLE.get(int(config.get("resample", 2)))
    if interpolation is None:
        raise SpecError(f"preprocessor_config.json resample={config.get('resample')!r} is not a PIL filter (0-5)")
    size = _size(config.get("size"), "size") if config.get("do_resize", True) else None
    crop = _size(config.get("crop_size"), "crop_size") if config.get("do_center_crop") else None
    if size is None:
        raise SpecError("preprocessor_config.json has do_resize false: the model spec resizes every image to "
                        "the model's input size")
    if "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        if crop is None:
            if "crop_pct" not in config:
                raise SpecError("preprocessor_config.json resizes the shortest edge without a crop: the output "
                                "size would depend on the image; give crop_size (do_center_crop) or crop_pct")
            height = width = shortest
            shortest = round(shortest / float(config["crop_pct"]))
        else:
            height, width = int(crop["height"]), int(crop["width"])
        mode, shorter_to = "shorter_side_crop", shortest
    elif "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
        if crop is not None:
            # Stretch to size, then cut the centre: a shorter-side resize when size is square.
            if height != width:
                raise SpecError(f"preprocessor_config.json resizes to {height}x{width} then crops: only a "
                                "square resize before a centre crop fits the model spec")
            mode, shorter_to = "shorter_side_crop", height
            height, width = int(crop["height"]), int(crop["width"])
        else:
            mode, shorter_to = "stretch", None
    else:
        raise SpecError(f"preprocessor_config.json size {size!r}: expected {{height, width}} or {{shortest_edge}}")
    mean = tuple(float(v) for v in config.get("image_mean", (0.0,))) if config.get("do_normalize") else (0.0,)
    std = tuple(float(v) for v in config.get("image_std", (1.0,))) if config.get("do_normalize") else (1.0,)
    scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    return (PreprocessSpec(resize=mode, resize_shorter_to=shorter_to, interpolation=interpolation, scale=scale,
                           offset=0.0, mean=mean, std=std), height, width)


def _size(value: Any, key: str) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, int):  # older configs: one number for a square
        return {"height": value, "width": value}
    if isinstance(value, dict):
        unknown = set(value) - {"height", "width", "shortest_edge", "longest_edge"}
        if unknown or "longest_edge" in value:
            raise SpecError(f"preprocessor_config.json {key} {value!r}: longest_edge and other keys are not supported")
        return value
    raise SpecError(f"preprocessor_config.json {key} {value!r}: expected a number or a mapping")
