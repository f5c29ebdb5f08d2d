"""The model spec: what a model takes, how image bytes become that input, and what it gives back.

Declarative and complete, stored in the manifest under "spec", and the one contract between the
model tooling (which writes it) and the worker (which executes it with
`modelspec.preprocess.preprocess_image`). The order of preprocessing is fixed:

    decode -> colour (alpha over white; gray, RGB or BGR) -> resize (stretch | shorter side to S,
    then centre crop | letterbox with padding) -> float32 -> * scale + offset -> (x - mean) / std
    -> layout (NHWC or NCHW)

That covers Keras `preprocess_input` in its three modes (`tf`: scale 2/255, offset -1; `torch`:
scale 1/255 then ImageNet mean/std on RGB; `caffe`: BGR, scale 1, mean [103.939, 116.779,
123.68]), torchvision's Resize(256)/CenterCrop(224)/Normalize recipe, and [-1, 1] scaling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modelspec.errors import SpecError

LAYOUTS = ("NHWC", "NCHW")
COLORS = ("gray", "rgb", "bgr")
RESIZE_MODES = ("stretch", "shorter_side_crop", "letterbox")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
OUTPUT_KINDS = ("logits", "probabilities")
ACTIVATIONS = ("sigmoid", "softmax", "none")
DTYPES = ("float32",)


@dataclass(frozen=True)
class InputSpec:
    name: str
    height: int
    width: int
    channels: int  # 1 or 3
    layout: str = "NHWC"
    color: str = "gray"  # gray for 1 channel; rgb or bgr for 3
    dtype: str = "float32"
    batch: int | None = None  # None: any batch size; a number: the model's fixed batch dimension

    @property
    def shape(self) -> tuple[int | None, int, int, int]:
        if self.layout == "NCHW":
            return (self.batch, self.channels, self.height, self.width)
        return (self.batch, self.height, self.width, self.channels)


@dataclass(frozen=True)
class PreprocessSpec:
    resize: str = "stretch"
    # shorter_side_crop: the shorter side is resized to this, then the centre (height x width) is
    # cut out. None: the larger of height and width (a crop of the whole shorter side).
    resize_shorter_to: int | None = None
    interpolation: str = "bilinear"
    letterbox_fill: int = 0  # the padding's value, 0-255, before scaling
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "logits"  # logits or probabilities
    activation: str = "sigmoid"  # sigmoid (one output), softmax (N), none (already probabilities)
    class_names: tuple[str, ...] = field(default_factory=tuple)
    threshold: float = 0.5  # binary models with one output: class_names[1] when score >= threshold
    top_k: int = 5
    # Numbers per image: 1 for a binary model scoring class_names[1] alone (sigmoid, or one
    # probability), else one per class. None: 1 with sigmoid, else len(class_names).
    units: int | None = None

    @property
    def width(self) -> int:
        if self.units is not None:
            return self.units
        return 1 if self.activation == "sigmoid" else len(self.class_names)


@dataclass(frozen=True)
class ModelSpec:
    input: InputSpec
    preprocess: PreprocessSpec
    output: OutputSpec

    def summary(self) -> str:
        """Short, for rows and logs: e.g. `224x224x3 NCHW bgr`."""
        return f"{self.input.height}x{self.input.width}x{self.input.channels} {self.input.layout} {self.input.color}"

    def to_dict(self) -> dict[str, Any]:
        as_dict = asdict(self)
        as_dict["preprocess"]["mean"] = list(self.preprocess.mean)
        as_dict["preprocess"]["std"] = list(self.preprocess.std)
        as_dict["output"]["class_names"] = list(self.output.class_names)
        return as_dict

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelSpec":
        if not isinstance(raw, dict) or not {"input", "output"} <= set(raw):
            raise SpecError("a model spec needs 'input' and 'output' (and may have 'preprocess')")
        spec = cls(
            input=_build(InputSpec, raw["input"], "input"),
            preprocess=_build(PreprocessSpec, raw.get("preprocess") or {}, "preprocess"),
            output=_build(OutputSpec, raw["output"], "output"),
        )
        return spec.validated()

    def validated(self) -> "ModelSpec":
        """Self-consistency; raises SpecError naming the key and both sides of a disagreement."""
        i, p, o = self.input, self.preprocess, self.output
        _one_of("input.layout", i.layout, LAYOUTS)
        _one_of("input.color", i.color, COLORS)
        _one_of("input.dtype", i.dtype, DTYPES)
        _one_of("preprocess.resize", p.resize, RESIZE_MODES)
        _one_of("preprocess.interpolation", p.interpolation, INTERPOLATIONS)
        _one_of("output.kind", o.kind, OUTPUT_KINDS)
        _one_of("output.activation", o.activation, ACTIVATIONS)
        if i.channels not in (1, 3):
            raise SpecError(f"input.channels is {i.channels}: 1 (gray) or 3 (RGB/BGR)")
        if (i.channels == 1) != (i.color == "gray"):
            raise SpecError(f"input.color {i.color!r} does not fit input.channels {i.channels} "
                            "(gray has 1 channel, rgb and bgr have 3)")
        if i.height < 1 or i.width < 1:
            raise SpecError(f"input size {i.height}x{i.width} must be positive")
        if i.batch is not None and i.batch < 1:
            raise SpecError(f"input.batch is {i.batch}: a positive fixed batch size, or null for any")
        for key, values in (("mean", p.mean), ("std", p.std)):
            if len(values) not in (1, i.channels):
                raise SpecError(f"preprocess.{key} has {len(values)} values for {i.channels} input channel(s): "
                                f"give 1 or {i.channels}")
        if any(value == 0 for value in p.std):
            raise SpecError("preprocess.std holds a 0: division by zero")
        if p.resize_shorter_to is not None and p.resize_shorter_to < max(i.height, i.width):
            raise SpecError(f"preprocess.resize_shorter_to {p.resize_shorter_to} is smaller than the "
                            f"{i.height}x{i.width} crop it must cover")
        if not 0 <= p.letterbox_fill <= 255:
            raise SpecError(f"preprocess.letterbox_fill {p.letterbox_fill} is not a 0-255 pixel value")
        if len(o.class_names) < 2:
            raise SpecError(f"output.class_names has {len(o.class_names)} name(s): a classifier has 2 or more")
        if len(set(o.class_names)) != len(o.class_names):
            raise SpecError("output.class_names repeats a name")
        if o.width == 1 and len(o.class_names) != 2:
            raise SpecError(f"one output unit scores class_names[1] against class_names[0], so 2 class names; "
                            f"got {len(o.class_names)}: give one unit per class with softmax")
        if o.width not in (1, len(o.class_names)):
            raise SpecError(f"output.units {o.width} does not fit {len(o.class_names)} class names "
                            "(1 for a binary model, else one per class)")
        if o.activation == "sigmoid" and o.width != 1:
            raise SpecError(f"output.activation sigmoid scores one unit; {o.width} units need softmax")
        if o.activation == "softmax" and o.width == 1:
            raise SpecError("output.activation softmax over one unit is always 1: use sigmoid")
        if o.kind == "probabilities" and o.activation != "none":
            raise SpecError(f"output.kind probabilities needs activation none (got {o.activation!r}): "
                            "the model's outputs are the scores already")
        if o.kind == "logits" and o.activation == "none":
            raise SpecError("output.kind logits needs activation sigmoid or softmax to become scores")
        if not 0.0 < o.threshold < 1.0:
            raise SpecError(f"output.threshold {o.threshold} must be between 0 and 1")
        if o.top_k < 1:
            raise SpecError(f"output.top_k {o.top_k} must be at least 1")
        return self


def _build(kind, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise SpecError(f"spec {where} must be a mapping, got {type(raw).__name__}")
    known = {f for f in kind.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"spec {where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = dict(raw)
    for key in ("mean", "std", "class_names"):
        if key in values:
            values[key] = tuple(values[key])
    try:
        return kind(**values)
    except TypeError as exc:
        raise SpecError(f"spec {where}: {exc}") from None


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{key} is {value!r}: one of {', '.join(allowed)}")


def demo_spec(class_names: tuple[str, ...] = ("grass", "moon"), threshold: float = 0.5) -> ModelSpec:
    """The seed CNN: 128x128 gray, stretched with bilinear, scaled to [0, 1], one logit."""
    return ModelSpec(
        input=InputSpec(name="image", height=128, width=128, channels=1, layout="NHWC", color="gray"),
        preprocess=PreprocessSpec(resize="stretch", interpolation="bilinear", scale=1.0 / 255.0),
        output=OutputSpec(name="logits", kind="logits", activation="sigmoid", class_names=tuple(class_names),
                          threshold=threshold, top_k=2),
    ).validated()


def spec_from_manifest(manifest: dict[str, Any]) -> ModelSpec:
    """The manifest's spec; a version built before specs existed is the demo CNN (its class names
    and threshold are in the manifest)."""
    if "spec" in manifest:
        return ModelSpec.from_dict(manifest["spec"])
    shape = (manifest.get("input") or {}).get("shape")
    if shape not in ([None, 128, 128, 1], (None, 128, 128, 1)):
        raise SpecError(f"manifest of {manifest.get('name')}/{manifest.get('version')} has no 'spec' and its input "
                        f"shape {shape} is not the demo CNN's: re-import the model with `python -m modelkit import`")
    return demo_spec(tuple(manifest["class_names"]), float(manifest["threshold"]))
